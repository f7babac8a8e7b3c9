"""`PatchingResult`: TransformerLens 4.3's typed patching result, per-example values with statistics on top.

The TransformerLens-named functions return one when called with `reduce="none"`, `baseline=True` or a mapping
of metrics, as TransformerLens does. `values` is laid out [metric?, *axes | n_rows, batch?]: the metric axis
only for a mapping of metrics, the swept axes (or one flat row axis when an `index_df` chose the cells), and
the batch axis only when not reduced. Everything is numpy; `index_df` and `to_dataframe` need pandas.

Statistics follow TransformerLens's definitions (`transformer_lens.utilities.statistics`): the standard error
is the unbiased standard deviation over sqrt(n); the sign-flip permutation p-value is exact (every sign
pattern) for 12 or fewer examples; bootstrap intervals and Monte-Carlo p-values draw from numpy's generator
seeded by `seed`, so they are reproducible but not the same draws as TransformerLens's torch generator.
"""

import dataclasses
import itertools

import numpy as np

from jaxlens.errors import InputError


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """Patching values with their layout and, optionally, the unpatched corrupted run's metric.

    Attributes:
        values: [metric?, *axes | n_rows, batch?].
        axis_names: the swept axes; [] when the cells were given as rows (`index_df`).
        metric_names: the metrics' names (["metric"] for a single function).
        reduced: the batch axis has been averaged away (or the metric returned a scalar).
        baseline: the metric of the unpatched corrupted run, [metric?, batch?], if asked for.
        has_metric_axis: `values` has a leading metric axis.
        patch_type_names: names along a leading `patch_type` axis (the `*_every` helpers).
        rows: [n_rows, n_columns] cell indices when the cells were given as rows, with `row_names`.
        row_names: the columns of `rows`.
    """

    values: np.ndarray
    axis_names: list[str]
    metric_names: list[str]
    reduced: bool
    baseline: np.ndarray | None = None
    has_metric_axis: bool = False
    patch_type_names: list[str] | None = None
    rows: np.ndarray | None = None
    row_names: list[str] | None = None

    def __getitem__(self, metric_name: str) -> "PatchingResult":
        """One metric's result, the metric axis dropped."""
        if metric_name not in self.metric_names:
            raise KeyError(f"Unknown metric {metric_name!r}; this result has {self.metric_names}.")
        if not self.has_metric_axis:
            return self
        i = self.metric_names.index(metric_name)
        return dataclasses.replace(self, values=self.values[i], metric_names=[metric_name],
                                   baseline=None if self.baseline is None else self.baseline[i],
                                   has_metric_axis=False)

    @property
    def index_df(self):
        """One row per swept cell, in the order of `values` (a pandas DataFrame)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("index_df needs pandas: pip install pandas.") from e
        return pd.DataFrame(self._cell_rows(), columns=self._cell_names())

    def mean(self) -> np.ndarray:
        """Batch mean per cell (`values` itself when already reduced)."""
        return self.values if self.reduced else self.values.mean(axis=-1)

    def stderr(self) -> np.ndarray:
        """Standard error of the batch mean per cell: unbiased standard deviation / sqrt(batch)."""
        v = self._per_example("stderr")
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
        v = self.effect() if of_effect else self._per_example("bootstrap_ci")
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
        self._per_example("permutation_pvalue")
        if alternative not in ("two-sided", "greater", "less"):
            raise InputError(f"alternative must be 'two-sided', 'greater' or 'less'; found {alternative!r}.")
        e = self.effect().astype(np.float64 if self.values.dtype == np.float64 else np.float32)
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

    def to_dataframe(self):
        """Long form: one row per (metric, cell, example) with its value (a pandas DataFrame)."""
        import pandas as pd

        cells, names = self._cell_rows(), self._cell_names()
        vals = self.values if self.has_metric_axis else self.values[None]
        vals = vals.reshape(len(self.metric_names), len(cells), -1)
        out = []
        for m, metric in enumerate(self.metric_names):
            for c, cell in enumerate(cells):
                for b in range(vals.shape[-1]):
                    row = {"metric": metric, **dict(zip(names, (int(i) for i in cell), strict=True))}
                    if self.patch_type_names is not None:
                        row["patch_type_name"] = self.patch_type_names[int(row["patch_type"])]
                    if not self.reduced:
                        row["example"] = b
                    row["value"] = float(vals[m, c, b])
                    out.append(row)
        return pd.DataFrame(out)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _cell_names(self) -> list[str]:
        return list(self.row_names) if self.rows is not None else list(self.axis_names)

    def _cell_rows(self) -> np.ndarray:
        if self.rows is not None:
            return self.rows
        lead = 1 if self.has_metric_axis else 0
        shape = self.values.shape[lead:lead + len(self.axis_names)]
        return np.indices(shape).reshape(len(shape), -1).T

    def _per_example(self, what: str) -> np.ndarray:
        if self.reduced:
            raise InputError(f"{what} needs per-example values: run the sweep with reduce='none'.")
        return self.values

    def _broadcast_baseline(self) -> np.ndarray:
        if self.baseline is None:
            raise InputError("effect and normalized need the corrupted run's metric: run the sweep with "
                             "baseline=True.")
        lead = 1 if self.has_metric_axis else 0
        middle = self.values.ndim - lead - (0 if self.reduced else 1)
        b = np.asarray(self.baseline)
        return b.reshape(b.shape[:lead] + (1,) * middle + b.shape[lead:])
