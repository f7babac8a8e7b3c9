"""`PatchResult`: what every patching function returns, a numpy array whose axes are named and labelled.

A sweep gives a grid over its swept axes ("layer", "pos", "head", ...), with a "metric" axis for a vector of
metrics; TransformerLens's functions give the same type laid out as TransformerLens 4.3's `PatchingResult`
(`[metric?, *axes | row, example?]`), so its attributes (`axis_names`, `metric_names`, `reduced`,
`has_metric_axis`, `patch_type_names`, `index_df`) and statistics are here too. The layout is the `axes`
tuple: `transpose`, `rename`, `pad` and `stack` act by name, and the statistics reduce the "example" axis
wherever it is, so no function converts between layouts.

    res = patching.sweep(params, cfg, corrupted, clean_cache, metric, hook="attn.hook_z",
                         axes=("layer", "pos", "head"))
    res.axes, res.shape           # ("layer", "pos", "head"), (n_layers, pos, n_heads)
    res.top_k(5)                  # [(value, {"layer": 9, "pos": 14, "head": 6}), ...]
    res.select(pos=14).plot()     # a layer x head heatmap
    np.asarray(res)               # the values

Three axis names are reserved: "metric" (labels: the metrics' names), "example" (per-example values over the
batch) and "row" (cells given as the rows of an `index_df`; each label is a tuple of indices, named by
`row_axes`). `baseline`, the metric of the unpatched corrupted run, has the result's "metric" and "example"
axes in the same order. Everything is numpy; `index_df` and `to_dataframe` need pandas, `plot` matplotlib.

Statistics follow TransformerLens's definitions (`transformer_lens.utilities.statistics`): the standard error
is the unbiased standard deviation over sqrt(n); the sign-flip permutation p-value is exact (every sign
pattern) for 12 or fewer examples; bootstrap intervals and Monte-Carlo p-values draw from numpy's generator
seeded by `seed`, so they are reproducible but not the same draws as TransformerLens's torch generator.
"""

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from jaxlens.errors import InputError

RESERVED = ("metric", "example", "row")
_PER_RUN = ("metric", "example")  # the axes a baseline has


@dataclasses.dataclass(frozen=True, eq=False, repr=False, init=False)
class PatchResult:
    """Patching values with named, labelled axes and, optionally, the unpatched corrupted run's metric.

    Attributes:
        values: the numpy array, one axis per name in `axes`.
        axes: the axis names, in order.
        labels: one tuple of labels per axis (indices by default; metric names on "metric").
        baseline: the metric of the unpatched corrupted run over the result's "metric" and "example" axes (in
            their order in `axes`; a scalar when it has neither), or None.
        name: the metric's name when there is no "metric" axis.
        row_axes: what the entries of each "row" label index (the `index_df` columns), or None.
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple, ...]
    baseline: np.ndarray | None
    name: str
    row_axes: tuple[str, ...] | None

    def __init__(self, values, axes: Sequence[str] | str, labels=None, baseline=None, *, name: str = "metric",
                 row_axes: Sequence[str] | None = None):
        """Args:
            values: array-like, one axis per name.
            axes: the axis names.
            labels: per-axis labels, as a sequence aligned with `axes` (None entries: indices) or a mapping
                {axis: labels} for some axes.
            baseline, name, row_axes: see the attributes.

        Raises:
            InputError: names and dimensions disagree, a repeated name, labels of the wrong length, a "row"
                axis without `row_axes`, or a baseline of the wrong shape.
        """
        values = np.asarray(values)
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if values.ndim != len(axes) or len(set(axes)) != len(axes):
            raise InputError(f"A result needs one distinct name per axis: values of shape {values.shape} "
                             f"with axes {axes}.")
        if isinstance(labels, Mapping):
            given = [labels.get(a) for a in axes]
        else:
            given = list(labels or [None] * len(axes))
        if len(given) != len(axes):
            raise InputError(f"labels has {len(given)} entries for the {len(axes)} axes {axes}.")
        labs = tuple(tuple(range(n)) if lab is None else tuple(lab) for lab, n in zip(given, values.shape,
                                                                                      strict=True))
        for a, lab, n in zip(axes, labs, values.shape, strict=True):
            if len(lab) != n:
                raise InputError(f"labels[{a!r}] has {len(lab)} entries for an axis of size {n}.")
        if "row" in axes and not row_axes:
            raise InputError("A result with a 'row' axis needs row_axes: the names of each row's indices.")
        if baseline is not None:
            baseline = np.asarray(baseline)
            want = tuple(n for a, n in zip(axes, values.shape, strict=True) if a in _PER_RUN)
            if baseline.shape != want:
                raise InputError(f"baseline must have the shape {want} of the result's metric/example axes; "
                                 f"found {baseline.shape}.")
        for field, v in (("values", values), ("axes", axes), ("labels", labs), ("baseline", baseline),
                         ("name", str(name)), ("row_axes", None if row_axes is None else tuple(row_axes))):
            object.__setattr__(self, field, v)

    # -- array ---------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def coords(self) -> dict[str, tuple]:
        """{axis: labels}."""
        return dict(zip(self.axes, self.labels, strict=True))

    def __array__(self, dtype=None, copy=None):
        return np.array(self.values, dtype=dtype, copy=True) if copy else np.asarray(self.values, dtype=dtype)

    def to_numpy(self) -> np.ndarray:
        """The values as a numpy array."""
        return np.asarray(self.values)

    def __treescope_repr__(self, path, subtree_renderer):
        """treescope: the values over the named axes, with their labels (`jaxlens.treescope_view`)."""
        from jaxlens.treescope_view import result_repr

        return result_repr(self, path, subtree_renderer)

    def __repr__(self) -> str:
        dims = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape, strict=True)) or "scalar"
        has = "metric" in self.axes
        metric = f"metrics {list(self.coords['metric'])}" if has else f"metric {self.name!r}"
        base = "" if self.baseline is None else ", with baseline"
        return f"PatchResult({dims}; {metric}{base})"

    # -- TransformerLens 4.3's PatchingResult attributes -----------------------------------------------------
    @property
    def axis_names(self) -> list[str]:
        """The swept axes (every axis but "metric", "example" and "row")."""
        return [a for a in self.axes if a not in RESERVED]

    @property
    def metric_names(self) -> list[str]:
        return list(self.coords["metric"]) if "metric" in self.axes else [self.name]

    @property
    def reduced(self) -> bool:
        """No per-example axis (the batch was averaged away, or the metric returned a scalar)."""
        return "example" not in self.axes

    @property
    def has_metric_axis(self) -> bool:
        return "metric" in self.axes

    @property
    def patch_type_names(self) -> list[str] | None:
        """Labels of a "patch_type" axis (the `*_every` helpers), else None."""
        return list(self.coords["patch_type"]) if "patch_type" in self.axes else None

    @property
    def index_df(self):
        """One row per cell (integer indices of the cell axes, or the `index_df` rows), in the order of the
        values (a pandas DataFrame)."""
        names, cells = self._cells()
        return _pandas("index_df").DataFrame(cells, columns=names)

    def __getitem__(self, metric_name: str) -> "PatchResult":
        """One metric's result, the metric axis dropped."""
        if metric_name not in self.metric_names:
            raise KeyError(f"Unknown metric {metric_name!r}; this result has {self.metric_names}.")
        return self.select(metric=metric_name) if self.has_metric_axis else self

    # -- statistics ------------------------------------------------------------------------------------------
    def mean(self) -> np.ndarray:
        """Batch mean per cell (`values` itself when already reduced)."""
        return self.values if self.reduced else self.values.mean(axis=self.axes.index("example"))

    def stderr(self) -> np.ndarray:
        """Standard error of the batch mean per cell: unbiased standard deviation / sqrt(batch)."""
        v = self._examples_last("stderr", self.values)
        n = v.shape[-1]
        if n < 2:
            raise InputError(f"stderr needs at least 2 examples in the batch; found {n}.")
        return v.std(axis=-1, ddof=1) / np.sqrt(n)

    def effect(self) -> np.ndarray:
        """`values - baseline`: the change each patch makes to the corrupted run's metric."""
        return self.values - self._broadcast_baseline()

    def normalized(self, clean_baseline) -> np.ndarray:
        """`(values - corrupted) / (clean - corrupted)`: 0 where a patch did nothing, 1 where it restored the
        clean metric. `clean_baseline` is the metric on the unpatched clean run, shaped like `baseline`; an
        example whose clean and corrupted metrics coincide gives inf or nan."""
        corrupted = self._broadcast_baseline()
        clean = np.asarray(clean_baseline, dtype=self.values.dtype)
        if clean.shape != self.baseline.shape:
            raise InputError(f"clean_baseline must have the baseline's shape {self.baseline.shape}; "
                             f"found {clean.shape}.")
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.values - corrupted) / (clean.reshape(corrupted.shape) - corrupted)

    def bootstrap_ci(self, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0,
                     statistic: str = "mean", of_effect: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval (low, high) of the batch `statistic` ("mean" or "median") per cell,
        of `effect()` with `of_effect=True`."""
        v = self._examples_last("bootstrap_ci", self.values)
        if of_effect:
            v = self._examples_last("bootstrap_ci", self.effect())
        if statistic not in ("mean", "median"):
            raise InputError(f"statistic must be 'mean' or 'median'; found {statistic!r}.")
        if not 0.0 < confidence < 1.0:
            raise InputError(f"confidence must be between 0 and 1 (exclusive); found {confidence}.")
        if n_resamples < 1:
            raise InputError(f"n_resamples must be at least 1; found {n_resamples}.")
        rng = np.random.default_rng(seed)
        stat = np.mean if statistic == "mean" else np.median
        n, draws = v.shape[-1], []
        for start in range(0, n_resamples, 256):
            idx = rng.integers(0, n, (min(256, n_resamples - start), n))
            draws.append(stat(v[..., idx], axis=-1))
        draws = np.concatenate(draws, axis=-1)
        alpha = (1.0 - confidence) / 2.0
        return np.quantile(draws, alpha, axis=-1), np.quantile(draws, 1.0 - alpha, axis=-1)

    def permutation_pvalue(self, *, n_permutations: int = 1000, seed: int = 0,
                           alternative: str = "two-sided") -> np.ndarray:
        """Sign-flip permutation p-value that each cell's mean effect is zero (needs `baseline`): exact over
        all 2**n sign patterns for n <= 12 examples, else (hits + 1) / (n_permutations + 1)."""
        self._examples_last("permutation_pvalue", self.values)
        if alternative not in ("two-sided", "greater", "less"):
            raise InputError(f"alternative must be 'two-sided', 'greater' or 'less'; found {alternative!r}.")
        e = self._examples_last("permutation_pvalue", self.effect())
        e = e.astype(np.float64 if self.values.dtype == np.float64 else np.float32)
        n = e.shape[-1]
        observed = e.mean(axis=-1, keepdims=True)
        tol = np.abs(observed) * 100 * np.finfo(e.dtype).eps

        def hits(signs):
            null = (e[..., None, :] * signs).mean(axis=-1)
            if alternative == "two-sided":
                return (np.abs(null) >= np.abs(observed) - tol).sum(-1)
            if alternative == "greater":
                return (null >= observed - tol).sum(-1)
            return (null <= observed + tol).sum(-1)

        if n <= 12:
            signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)), e.dtype)
            return (hits(signs) / len(signs)).astype(e.dtype)
        rng, total = np.random.default_rng(seed), 0
        for start in range(0, n_permutations, 256):
            signs = rng.integers(0, 2, (min(256, n_permutations - start), n)).astype(e.dtype) * 2 - 1
            total = total + hits(signs)
        return ((total + 1.0) / (n_permutations + 1.0)).astype(e.dtype)

    # -- finding cells ---------------------------------------------------------------------------------------
    def rank(self, by: str = "abs", metric: int | str = 0) -> list[tuple[float, dict]]:
        """Every cell, best first: `by` is "abs" (largest |value|), "max" or "min".

        Returns:
            [(value, {axis: label})]; with a "metric" axis, ranked by the metric `metric` (index or name);
            with an "example" axis, by the batch mean; a "row" label is spread over its `row_axes`.
        """
        if by not in ("abs", "max", "min"):
            raise InputError(f"rank(by=...) must be 'abs', 'max' or 'min'; found {by!r}.")
        r = self
        if "metric" in r.axes:
            names = r.coords["metric"]
            r = r.select(metric=names[metric] if isinstance(metric, (int, np.integer)) else metric)
        vals = r.mean()
        kept = [(a, lab) for a, lab in zip(r.axes, r.labels, strict=True) if a != "example"]
        keys = {"abs": -np.abs(vals), "max": -vals, "min": vals}[by]
        out = []
        for flat in np.argsort(keys, axis=None, kind="stable"):
            where = np.unravel_index(flat, vals.shape)
            cell = {}
            for (a, lab), j in zip(kept, where, strict=True):
                cell.update(zip(r.row_axes, lab[j], strict=True) if a == "row" else {a: lab[j]})
            out.append((float(vals[where]), cell))
        return out

    def top_k(self, k: int = 10, by: str = "abs", metric: int | str = 0) -> list[tuple[float, dict]]:
        """The k best cells (see `rank`)."""
        return self.rank(by, metric)[:k]

    def select(self, **index) -> "PatchResult":
        """Fix some axes at one label each (`res.select(metric="ld", head=3)`), dropping them (and from the
        baseline, for "metric" and "example")."""
        vals, axes, labels = self.values, list(self.axes), list(self.labels)
        base, name = self.baseline, self.name
        for axis, label in index.items():
            if axis not in axes:
                raise InputError(f"select({axis}=...): the result has axes {tuple(axes)}, no {axis!r}.")
            i = axes.index(axis)
            if label not in labels[i]:
                raise InputError(f"select({axis}={label!r}): not a label of {axis!r}; its labels are "
                                 f"{labels[i][:10]}{'...' if len(labels[i]) > 10 else ''}.")
            j = labels[i].index(label)
            vals = np.take(vals, j, axis=i)
            if base is not None and axis in _PER_RUN:
                base = np.take(base, j, axis=[a for a in axes if a in _PER_RUN].index(axis))
            name = str(label) if axis == "metric" else name
            del axes[i], labels[i]
        row_axes = self.row_axes if "row" in axes else None
        return PatchResult(vals, axes, labels, base, name=name, row_axes=row_axes)

    # -- layout ----------------------------------------------------------------------------------------------
    def transpose(self, *axes: str) -> "PatchResult":
        """The same result with its axes in this order (every axis named once)."""
        if sorted(axes) != sorted(self.axes):
            raise InputError(f"transpose{axes} must name each of the axes {self.axes} once.")
        perm = [self.axes.index(a) for a in axes]
        base = self.baseline
        if base is not None:
            old = [a for a in self.axes if a in _PER_RUN]
            base = np.transpose(base, [old.index(a) for a in axes if a in _PER_RUN])
        return dataclasses.replace(self, values=np.transpose(self.values, perm), axes=axes,
                                   labels=[self.labels[i] for i in perm], baseline=base)

    def rename(self, **names: str) -> "PatchResult":
        """Rename axes (`res.rename(head_index="head")`); the reserved names cannot be given or taken."""
        if any(a not in self.axes for a in names):
            raise InputError(f"rename: the result has axes {self.axes}; found {tuple(names)}.")
        if set(RESERVED) & (set(names) | set(names.values())):
            raise InputError(f"rename: {RESERVED} have fixed meanings; rename other axes.")
        return dataclasses.replace(self, axes=tuple(names.get(a, a) for a in self.axes))

    def pad(self, value: float = 0.0, **sizes: int) -> "PatchResult":
        """Extend indexed axes to these sizes (`res.pad(head=n_heads)`), new cells holding `value`."""
        vals, labels = self.values, list(self.labels)
        for axis, size in sizes.items():
            i = self.axes.index(axis) if axis in self.axes else None
            if i is None or labels[i] != tuple(range(vals.shape[i])) or size < vals.shape[i]:
                have = dict(zip(self.axes, self.shape, strict=True))
                raise InputError(f"pad({axis}={size}): needs an index-labelled axis {axis!r} of at most "
                                 f"{size} entries; the result has axes {have}.")
            widths = [(0, size - vals.shape[i]) if k == i else (0, 0) for k in range(vals.ndim)]
            vals, labels[i] = np.pad(vals, widths, constant_values=value), tuple(range(size))
        return dataclasses.replace(self, values=vals, labels=labels)

    @classmethod
    def stack(cls, results: Sequence["PatchResult"], axis: str, labels: Sequence | None = None, *,
              position: int = 0) -> "PatchResult":
        """Results of the same axes and shape stacked on a new axis at `position`; they share a baseline (one
        corrupted run), taken from the first."""
        first = results[0]
        if any(r.axes != first.axes or r.shape != first.shape for r in results):
            raise InputError(f"stack needs results of the same axes and shape; found "
                             f"{[dict(zip(r.axes, r.shape, strict=True)) for r in results]}.")
        axes = first.axes[:position] + (axis,) + first.axes[position:]
        new = None if labels is None else tuple(labels)
        labs = first.labels[:position] + (new,) + first.labels[position:]
        return cls(np.stack([r.values for r in results], axis=position), axes, labs, first.baseline,
                   name=first.name, row_axes=first.row_axes)

    # -- presenting ------------------------------------------------------------------------------------------
    def plot(self, title: str = "", **kw):
        """A labelled heatmap of a 2-D result (rows: the first axis); `select` other axes first. Needs
        matplotlib."""
        if self.ndim != 2:
            last = self.axes[-1] if self.axes else None
            fix = next((a for a in ("metric", "example") if a in self.axes), last)
            hint = "" if fix is None else f", e.g. .select({fix}={self.coords[fix][0]!r})"
            raise InputError(f"plot() draws 2-D results; this one has axes {self.axes}. Fix the others with "
                             f".select(axis=label){hint}.")
        from jaxlens.viz import heatmap

        return heatmap(self.values, row_labels=[str(x) for x in self.labels[0]],
                       col_labels=[str(x) for x in self.labels[1]], ylabel=self.axes[0], xlabel=self.axes[1],
                       title=title, **kw)

    def to_dataframe(self):
        """Long form (a pandas DataFrame): one row per (metric, cell, example) with columns "metric" (the
        name), each cell axis's index, "<axis>_name" for axes labelled other than by index (e.g.
        "patch_type_name"), "example" when per-example, and "value"."""
        pd = _pandas("to_dataframe")
        names, cells = self._cells()
        order = ["metric"] * self.has_metric_axis + [a for a in self.axes if a not in _PER_RUN]
        order += ["example"] * (not self.reduced)
        n_m, n_c = len(self.metric_names), len(cells)
        flat = self.transpose(*order).values.reshape(n_m, n_c, -1)
        n_e = flat.shape[-1]
        cols = {"metric": np.repeat(np.asarray(self.metric_names, dtype=object), n_c * n_e)}
        for j, col in enumerate(names):
            cols[col] = np.tile(np.repeat(cells[:, j], n_e), n_m)
        for a, lab in zip(self.axes, self.labels, strict=True):
            if a not in RESERVED and lab != tuple(range(len(lab))):
                cols[f"{a}_name"] = np.asarray(lab, dtype=object)[cols[a]]
        if not self.reduced:
            cols["example"] = np.tile(np.arange(n_e), n_m * n_c)
        cols["value"] = flat.reshape(-1).astype(np.float64)
        return pd.DataFrame(cols)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _cells(self) -> tuple[list[str], np.ndarray]:
        """(column names, [n_cells, n_columns] integer indices) of the cell axes, in the values' order."""
        cell = [(a, lab) for a, lab in zip(self.axes, self.labels, strict=True) if a not in _PER_RUN]
        shape = [len(lab) for _, lab in cell]
        n = int(np.prod(shape))
        idx = np.indices(shape).reshape(len(shape), n).T if shape else np.zeros((1, 0), np.int64)
        names, cols = [], []
        for j, (a, lab) in enumerate(cell):
            if a == "row":
                names += list(self.row_axes)
                cols.append(np.asarray(lab, np.int64).reshape(len(lab), -1)[idx[:, j]])
            else:
                names.append(a)
                cols.append(idx[:, j:j + 1].astype(np.int64))
        return names, (np.concatenate(cols, axis=1) if cols else np.zeros((n, 0), np.int64))

    def _examples_last(self, what: str, v: np.ndarray) -> np.ndarray:
        if self.reduced:
            raise InputError(f"{what} needs per-example values: run the sweep with reduce='none'.")
        return np.moveaxis(v, self.axes.index("example"), -1)

    def _broadcast_baseline(self) -> np.ndarray:
        if self.baseline is None:
            raise InputError("effect and normalized need the corrupted run's metric: run the sweep with "
                             "baseline=True.")
        return self.baseline.reshape([n if a in _PER_RUN else 1 for a, n in zip(self.axes, self.shape,
                                                                                strict=True)])


# TransformerLens 4.3's name for the same type (its functions' typed result), so `isinstance` checks hold.
PatchingResult = PatchResult


def _pandas(what: str):
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(f"{what} needs pandas: pip install pandas.") from e
    return pd
