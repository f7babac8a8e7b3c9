"""The attribution graph of one prompt: nodes, the adjacency A[target, source], pruning, scores, files.

Node order (circuit-tracer 0.5's, ../shared/RESEARCH.md 1.3): the selected active features (layer-major, then
position, then feature index), the error nodes (index layer * n_pos + pos), the token nodes (one per
position), the logit nodes (the top logits, most probable first). Rows are targets, columns sources.

    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)   # masks and cumulative influence
    graph.scores()                                                  # (replacement, completeness)
    graph.save("france.graph.npz"); graph = AttributionGraph.load("france.graph.npz")
    graph.save_circuit_tracer("graphs/", "france")                  # circuit-tracer's frontend files
    graph.save_html("france.html")                                  # jaxlens's offline viewer

The algorithms live in `prune.py` (influence, pruning, scores) and `export.py` (the frontend JSON); this file
holds the container, its checks and its own lossless file format.
"""

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import _atomic
from jaxlens.errors import InputError
from jaxlens.graphs import export, prune
from jaxlens.graphs.prune import PruneResult

FILE_FORMAT = "jaxlens-attribution-graph"
FILE_VERSION = 1
_ARRAYS = ("tokens", "active_features", "activation_values", "selected_features", "adjacency", "logit_tokens",
           "logit_probabilities")
_META_KEY = "__metadata__"


@dataclasses.dataclass
class AttributionGraph:
    """An attribution graph (built by `jaxlens.graphs.attribute`).

    Attributes:
        prompt: the tokens the model read, decoded (special prefix included: circuit-tracer's input_string).
        tokens: [n_pos] token ids (with the special prefix).
        token_strings: [n_pos] each token decoded.
        active_features: [n_active, 3] (layer, pos, feature) of every active feature (prefix zeroed).
        activation_values: [n_active] their activations.
        selected_features: [n_selected] indices into active_features of the feature nodes, ascending.
        adjacency: [n_nodes, n_nodes] float32, A[target, source], nodes in the module docstring's order.
        logit_tokens: [n_logits] vocabulary ids of the logit nodes.
        logit_probabilities: [n_logits] their probabilities at the last position.
        logit_strings: [n_logits] each decoded.
        n_layers: layers of the model.
        vocab_size: the model's vocabulary.
        model_name: the model's name (for files).
        transcoder_name: the transcoder set's name (circuit-tracer's `scan`).
        feature_input_hook, feature_output_hook: the hooks the transcoders read and write (relative names).
        zero_positions: the number of prefix positions whose features and errors are zeroed.

    Raises:
        InputError: (on construction) fields whose sizes do not fit together, e.g. an adjacency that is not
            [logit_offset + n_logits] square.
    """

    prompt: str
    tokens: np.ndarray
    token_strings: list[str]
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    adjacency: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    logit_strings: list[str]
    n_layers: int
    vocab_size: int
    model_name: str = ""
    transcoder_name: str = ""
    feature_input_hook: str = ""
    feature_output_hook: str = ""
    zero_positions: int = 1

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def token_offset(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_offset(self) -> int:
        return self.token_offset + self.n_pos

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise InputError unless the fields' shapes fit together (cheap: no pass over the adjacency)."""
        n_active = len(self.active_features)
        _check(np.ndim(self.tokens) == 1 and len(self.tokens) > 0, "tokens", "a non-empty [n_pos] array",
               np.shape(self.tokens))
        _check(np.ndim(self.active_features) == 2 and np.shape(self.active_features)[1] == 3,
               "active_features", "[n_active, 3] (layer, pos, feature)", np.shape(self.active_features))
        _check(np.shape(self.activation_values) == (n_active,), "activation_values",
               f"[n_active] = [{n_active}]", np.shape(self.activation_values))
        sel = np.asarray(self.selected_features)
        _check(sel.ndim == 1 and (sel.size == 0 or (0 <= sel.min() and sel.max() < n_active)),
               "selected_features", f"[n_selected] indices into active_features (0..{n_active - 1})",
               f"shape {sel.shape}, range {(sel.min(), sel.max()) if sel.size else ()}")
        n_logits = len(self.logit_tokens)
        _check(np.shape(self.logit_probabilities) == (n_logits,), "logit_probabilities",
               f"[n_logits] = [{n_logits}]", np.shape(self.logit_probabilities))
        _check(len(self.token_strings) == self.n_pos, "token_strings",
               f"{self.n_pos} strings (one per token)", len(self.token_strings))
        _check(len(self.logit_strings) == n_logits, "logit_strings",
               f"{n_logits} strings (one per logit)", len(self.logit_strings))
        _check(isinstance(self.n_layers, int | np.integer) and self.n_layers > 0, "n_layers",
               "a positive int", self.n_layers)
        n = self.logit_offset + n_logits
        _check(np.shape(self.adjacency) == (n, n), "adjacency",
               f"[{n}, {n}] = n_selected {self.n_features} + n_layers*n_pos {self.n_layers * self.n_pos} + "
               f"n_pos {self.n_pos} + n_logits {n_logits} nodes square, A[target, source]",
               np.shape(self.adjacency))

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """The nodes and edges that carry most of the influence on the logits (see `prune.prune_graph`).

        Args:
            node_threshold: the fraction of node influence to keep, in (0, 1].
            edge_threshold: the fraction of edge influence to keep, in (0, 1].

        Returns:
            PruneResult(node_mask [n_nodes], edge_mask [n_nodes, n_nodes], cumulative_scores [n_nodes]).

        Raises:
            InputError: a threshold outside (0, 1], or a malformed or cyclic adjacency.
        """
        self.check()
        return prune.prune_graph(self.adjacency, self.logit_probabilities, n_features=self.n_features,
                                 n_tokens=self.n_pos, node_threshold=node_threshold,
                                 edge_threshold=edge_threshold)

    def scores(self) -> tuple[float, float]:
        """(replacement_score, completeness_score), as circuit-tracer's `compute_graph_scores`.

        Raises:
            InputError: a malformed or cyclic adjacency.
        """
        self.check()
        return prune.graph_scores(self.adjacency, self.logit_probabilities, n_features=self.n_features,
                                  n_errors=self.n_layers * self.n_pos, n_tokens=self.n_pos)

    def save_circuit_tracer(self, out_dir: str | os.PathLike, slug: str, node_threshold: float = 0.8,
                            edge_threshold: float = 0.98, *, scan: str | Sequence[str] | None = None) -> Path:
        """Write circuit-tracer's `<out_dir>/<slug>.json` and upsert `<out_dir>/graph-metadata.json`.

        See `jaxlens.graphs.export.save_circuit_tracer`; returns the graph file's path.
        """
        return export.save_circuit_tracer(self, out_dir, slug, node_threshold, edge_threshold, scan=scan)

    def save_html(self, path: str | os.PathLike, dashboards: Mapping | None = None, *,
                  node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
        """Write the pruned graph as jaxlens's self-contained offline viewer page (`viewer.save_graph_html`).

        Args:
            path: the .html file; its stem is the graph's slug.
            dashboards: feature dashboards by node id or (layer, feature), shown when a feature is clicked.
            node_threshold, edge_threshold: the pruning fractions, in (0, 1].

        Returns:
            The page's path.
        """
        from jaxlens.graphs.viewer import save_graph_html

        data = export.frontend_json(self, Path(path).stem, node_threshold, edge_threshold)
        return save_graph_html(data, path, dashboards=dashboards)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole graph, losslessly, to one `.npz` file (arrays, JSON metadata, no pickle).

        Written atomically; read it back with `AttributionGraph.load`.

        Returns:
            `path`.
        """
        self.check()
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _ARRAYS}
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, **meta, "n_layers": int(self.n_layers),
                "vocab_size": int(self.vocab_size), "zero_positions": int(self.zero_positions),
                "token_strings": [str(t) for t in self.token_strings],
                "logit_strings": [str(t) for t in self.logit_strings]}
        arrays = {name: np.asarray(getattr(self, name)) for name in _ARRAYS}
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
        with _atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttributionGraph":
        """Read a graph written by `AttributionGraph.save`.

        Raises:
            InputError: the file is missing, is not a jaxlens graph file, or is of a newer version.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"No graph file at {path}. Write one with `graph.save(path)`.")
        hint = "Graph files are written by `AttributionGraph.save`."
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {name: z[name] for name in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise InputError(f"{path} is not a jaxlens graph file (not a readable .npz: {e}). {hint}") \
                from None
        missing = [name for name in (*_ARRAYS, _META_KEY) if name not in data]
        try:
            meta = json.loads(data[_META_KEY].tobytes().decode("utf-8")) if not missing else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
            raise InputError(f"{path} is not a jaxlens graph file: it is an .npz without the graph's "
                             f"metadata (missing {missing or [_META_KEY]}). {hint}")
        if meta.get("version") != FILE_VERSION:
            raise InputError(f"{path} is a jaxlens graph file of version {meta.get('version')!r}; this "
                             f"jaxlens reads version {FILE_VERSION}. Upgrade jaxlens, or rebuild the graph.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(meta) - fields - {"format", "version"}
        if unknown:
            raise InputError(f"{path} has unknown graph fields {sorted(unknown)}. {hint}")
        kwargs = {k: v for k, v in meta.items() if k in fields}
        return cls(**kwargs, **{name: data[name] for name in _ARRAYS})


def _check(ok: Any, name: str, expected: str, found: Any) -> None:
    if not ok:
        raise InputError(f"AttributionGraph.{name} must be {expected}; found {found}. Build graphs with "
                         "jaxlens.graphs.attribute, or fix the field before pruning or saving.")
