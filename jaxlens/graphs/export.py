"""An attribution graph as circuit-tracer's frontend JSON (schema version 1) and its `graph-metadata.json`.

The files open in the tools people already use for attribution graphs: circuit-tracer's local server and
Neuronpedia's graph viewer read `<dir>/<slug>.json` and the list of graphs in `<dir>/graph-metadata.json`.
The format is circuit-tracer 0.5's (`utils/create_graph_files.py`, `frontend/graph_models.py`;
../shared/RESEARCH.md 1.9): the pruned nodes and the kept edges, weight A[target, source].

    data = frontend_json(graph, "france", node_threshold=0.8, edge_threshold=0.98)   # a dict; nothing written
    save_circuit_tracer(graph, "graphs/", "france")      # graphs/france.json, graphs/graph-metadata.json

One deliberate difference: circuit-tracer names the error node of (layer, pos) `0_{layer}_{pos}`, which is
also the name of feature `layer` at layer 0 and the same position; the viewers key nodes by name and would
merge the two, so an error node whose name is taken by a feature gets `_error` appended.
"""

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import _atomic
from jaxlens.errors import InputError
from jaxlens.graphs.prune import PruneResult

METADATA_FILE = "graph-metadata.json"
SCHEMA_VERSION = 1


def frontend_json(
    graph: Any,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    scan: str | Sequence[str] | None = None,
    pruned: PruneResult | None = None,
) -> dict:
    """The circuit-tracer frontend JSON of a pruned graph, as a dict (`json.dumps` it to get the file).

    Args:
        graph: a `jaxlens.graphs.AttributionGraph`.
        slug: the graph's name in the viewers (and its file name, `<slug>.json`).
        node_threshold: passed to `graph.prune`, and recorded in the metadata.
        edge_threshold: passed to `graph.prune`.
        scan: the transcoder set's identifier (default `graph.transcoder_name`); a list of per-layer names
            becomes `"custom-<hash>"` with the list in `transcoder_list`, as in circuit-tracer (the hash here
            is stable across processes, circuit-tracer's Python `hash` is not).
        pruned: the result of `graph.prune(node_threshold, edge_threshold)` when already computed.

    Returns:
        {"metadata", "qParams", "nodes", "links"}: nodes are the kept nodes that touch a kept edge, plus every
        token and logit node; links are the kept edges between kept nodes, {"source", "target", "weight"}.

    Raises:
        InputError: a slug that is not a plain file name, or thresholds outside (0, 1].
    """
    check_slug(slug)
    if pruned is None:
        pruned = graph.prune(node_threshold=node_threshold, edge_threshold=edge_threshold)
    nodes = _nodes(graph, pruned)
    kept = pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    targets, sources = np.nonzero(kept)  # row-major: by target, then source
    weights = np.asarray(graph.adjacency)[targets, sources].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)]
    connected = set(targets.tolist()) | set(sources.tolist())
    used = [node for i, node in nodes.items()
            if i in connected or node["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": _metadata(graph, slug, node_threshold, scan),
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def save_circuit_tracer(
    graph: Any,
    out_dir: str | os.PathLike,
    slug: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    scan: str | Sequence[str] | None = None,
) -> Path:
    """Write `<out_dir>/<slug>.json` and add (or replace) its entry in `<out_dir>/graph-metadata.json`.

    Both files are written atomically; the metadata file keeps the entries of the other graphs.

    Args:
        graph: a `jaxlens.graphs.AttributionGraph`.
        out_dir: the folder (created if missing) that circuit-tracer's server serves as `--graph_file_dir`.
        slug: the graph's name: a plain file name, no path separators.
        node_threshold, edge_threshold: the pruning fractions, in (0, 1].
        scan: the transcoder set's identifier (default `graph.transcoder_name`).

    Returns:
        The path of the graph file.

    Raises:
        InputError: a bad slug or threshold, no scan, `out_dir` not a folder, or a metadata file that is not
            circuit-tracer's `{"graphs": [...]}`.
    """
    check_slug(slug)
    if not (scan if scan is not None else graph.transcoder_name):
        raise InputError(
            "The graph has no transcoder set name (graph.transcoder_name is empty and no scan was given); "
            "circuit-tracer's files identify the transcoders by it. Pass scan='<the transcoder set name>'.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output folder {out} exists and is not a folder; choose another one.")
    data = frontend_json(graph, slug, node_threshold, edge_threshold, scan=scan)
    path = _atomic.write_text(out / f"{slug}.json", json.dumps(data, indent=2, ensure_ascii=False))
    add_graph_metadata(data["metadata"], out)
    return path


def add_graph_metadata(metadata: dict, out_dir: str | os.PathLike) -> Path:
    """Upsert one graph's metadata into `<out_dir>/graph-metadata.json` ({"graphs": [...]}), atomically.

    An entry with the same slug is replaced (the new one goes last); the others are kept as they were.

    Args:
        metadata: the `"metadata"` of a `frontend_json` dict (it has a `"slug"`).
        out_dir: the folder of the graph files.

    Returns:
        The path of the metadata file.

    Raises:
        InputError: the existing metadata file is not JSON of the form {"graphs": [{"slug": ...}, ...]}.
    """
    path = Path(out_dir) / METADATA_FILE
    listing = {"graphs": []}
    if path.exists():
        try:
            listing = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not valid JSON ({e}); move it away or delete it.") from None
        graphs = listing.get("graphs") if isinstance(listing, dict) else None
        if not isinstance(graphs, list) or not all(isinstance(g, dict) and "slug" in g for g in graphs):
            raise InputError(
                f"{path} is not a circuit-tracer graph list: expected "
                f"{{\"graphs\": [{{\"slug\": ...}}, ...]}}, found {type(listing).__name__} "
                f"{str(listing)[:80]}. Move it away or delete it.")
    listing["graphs"] = [g for g in listing["graphs"] if g["slug"] != metadata["slug"]] + [metadata]
    return _atomic.write_text(path, json.dumps(listing, indent=2))


def check_slug(slug: str) -> None:
    """Raise InputError unless `slug` can name `<slug>.json` inside the output folder."""
    bad = (not isinstance(slug, str) or not slug or slug in (".", "..") or "\0" in slug
           or any(sep in slug for sep in ("/", "\\", os.sep)) or slug == Path(METADATA_FILE).stem)
    if bad:
        raise InputError(
            f"A graph slug names the file <slug>.json in the output folder, so it must be a non-empty file "
            f"name without path separators, not '.', '..' or {Path(METADATA_FILE).stem!r}; got {slug!r}. "
            "Use for example 'capital-france'.")


def cantor_pair(x: int, y: int) -> int:
    """The Cantor pairing `(x + y)(x + y + 1) / 2 + y`: circuit-tracer's id of feature y at layer x."""
    return (x + y) * (x + y + 1) // 2 + y


def _nodes(graph: Any, pruned: PruneResult) -> dict[int, dict]:
    """The frontend node of every node in `pruned.node_mask`, by node index, in index order."""
    n_features, n_pos, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    influence = pruned.cumulative_scores
    nodes, feature_ids = {}, set()
    for i in np.flatnonzero(pruned.node_mask).tolist():
        if i < n_features:
            active = int(graph.selected_features[i])
            layer, pos, feat = (int(v) for v in graph.active_features[active])
            node = _node(f"{layer}_{feat}_{pos}", cantor_pair(layer, feat), str(layer), pos,
                         "cross layer transcoder", f"{layer}_{feat}-0", influence=_number(influence[i]),
                         activation=_number(graph.activation_values[active]))
            feature_ids.add(node["node_id"])
        elif i < graph.token_offset:
            layer, pos = divmod(i - n_features, n_pos)
            node_id = f"0_{layer}_{pos}"
            node = _node(node_id + "_error" if node_id in feature_ids else node_id, -1, str(layer), pos,
                         "mlp reconstruction error", f"{layer}_{pos}-0", influence=_number(influence[i]))
        elif i < graph.logit_offset:
            pos = i - graph.token_offset
            vocab = int(graph.tokens[pos])
            node = _node(f"E_{vocab}_{pos}", pos, "E", pos, "embedding", f"E_{vocab}-{pos}",
                         influence=_number(influence[i]))
        else:
            k = i - graph.logit_offset
            vocab, prob, pos, layer = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k]), \
                n_pos - 1, str(n_layers + 1)
            node = _node(f"{layer}_{vocab}_{pos}", vocab, layer, pos, "logit", f"L_{vocab}-{pos}",
                         token_prob=prob, is_target_logit=k == 0,
                         clerp=f'Output "{graph.logit_strings[k]}" (p={prob:.3f})')
        nodes[i] = node
    return nodes


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_node_id: str, *,
          token_prob: float = 0.0, is_target_logit: bool = False, clerp: str = "",
          influence: float | None = None, activation: float | None = None) -> dict:
    """One frontend node, with circuit-tracer's fields in its order."""
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx,
            "feature_type": feature_type, "token_prob": token_prob, "is_target_logit": is_target_logit,
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_node_id, "clerp": clerp,
            "influence": influence, "activation": activation}


def _metadata(graph: Any, slug: str, node_threshold: float, scan: str | Sequence[str] | None) -> dict:
    scan = graph.transcoder_name if scan is None else scan
    transcoder_list: list[str] = []
    if not isinstance(scan, str):
        transcoder_list = [str(s) for s in scan]
        digest = hashlib.sha256("-".join(transcoder_list).encode("utf-8")).digest()[:8]
        scan = f"custom-{int.from_bytes(digest, 'big', signed=True)}"
    return {"slug": slug, "scan": scan, "transcoder_list": transcoder_list,
            "prompt_tokens": [str(t) for t in graph.token_strings], "prompt": graph.prompt,
            "node_threshold": float(node_threshold), "schema_version": SCHEMA_VERSION}


def _number(value: Any) -> float | None:
    """A JSON number, or None (null) for nan/inf, as pydantic writes them."""
    value = float(value)
    return value if math.isfinite(value) else None
