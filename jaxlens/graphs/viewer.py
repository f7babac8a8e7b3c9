"""jaxlens's offline attribution-graph viewer: one self-contained HTML page for a circuit-tracer graph file.

The input is the frontend JSON of circuit-tracer 0.5 (schema version 1, ../shared/RESEARCH.md 1.9:
`{"metadata", "qParams", "nodes", "links"}`), as `jaxlens.graphs.export.frontend_json` writes it or as
circuit-tracer's `create_graph_files` does. The page lays the graph out by layer (token embeddings at the
bottom, logits at the top) and by position (one column per prompt token, labelled underneath); features are
circles, error nodes squares, embeddings diamonds and logits triangles; an edge's width shows the size of its
weight and its colour the sign (blue positive, red negative). Hovering a node or an edge shows its details,
clicking a feature opens its dashboard (top activating contexts, promoted and suppressed logits: the
`FeatureDashboard`s of `jaxlens.dictionaries.dashboard`, rendered by the same HTML code as their own page),
and shift-clicking (or the Pin button) pins nodes into a subgraph, which can be shown alone or cleared.
`qParams.pinnedIds` and `qParams.clickedId` are honoured as the initial state.

    page = graph_html(graph_json, dashboards={(3, 1187): board})   # or keyed by node_id, "3_1187_5"
    save_graph_html(graph_json, "france.html", dashboards=boards)  # atomic; opens from file://

Everything is inline (the script and style sheet in `jaxlens/graphs/_viewer/` are read from the package and
embedded): the page fetches nothing, so it works offline and from disk. All text from the graph reaches the
page as data (JSON in a non-executed script element, set through `textContent`), never as markup.
"""

import difflib
import html
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import _atomic
from jaxlens.dictionaries import _dashboard_html
from jaxlens.dictionaries.dashboard import FeatureDashboard
from jaxlens.errors import InputError

# circuit-tracer's feature_type values -> the viewer's node kinds (RESEARCH.md 1.9's table)
KINDS = {"cross layer transcoder": "feature", "mlp reconstruction error": "error", "embedding": "embedding",
         "logit": "logit"}
REQUIRED = ("metadata", "nodes", "links")
NODE_FIELDS = ("node_id", "feature_type", "layer", "ctx_idx")
_FEATURE_ID = re.compile(r"(\d+)_(\d+)_(\d+)")  # f"{layer}_{feature}_{pos}"


def graph_html(graph_json: Mapping[str, Any], dashboards: Mapping | None = None,
               title: str | None = None) -> str:
    """The viewer page of one attribution graph, as a string.

    Args:
        graph_json: circuit-tracer frontend JSON (schema version 1): "metadata" (with "prompt_tokens"),
            "nodes" (each with node_id, feature_type, layer, ctx_idx, and optionally feature, activation,
            influence, clerp, token_prob), "links" ({source, target, weight}) and optionally "qParams"
            (pinnedIds, clickedId).
        dashboards: FeatureDashboards to open on click, keyed by a feature node's node_id (str) or by
            (layer, feature index); one (layer, feature) key serves that feature at every position.
        title: the page title (default: the prompt, else the slug).

    Returns:
        The HTML document (script, style sheet, data and dashboards inline).

    Raises:
        InputError: a field the schema requires is missing or of the wrong type, a duplicate node id, a link
            or pin naming an unknown node, a non-finite weight, or a dashboard that matches no feature node
            of the graph (or shows a different feature than its key).
    """
    data = _checked(graph_json)
    boards, dash_of = _dashboards(dashboards, data["nodes"])
    data["dashboards"] = dash_of
    meta = data["metadata"]
    if title is None:
        title = str(meta.get("prompt") or meta.get("slug") or "attribution graph")
    try:
        payload = json.dumps(data, default=_plain, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"graph_json holds a value JSON cannot represent ({e}). Use numbers, strings, lists "
                         "and dicts, as circuit-tracer's files do.") from None
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    templates = "\n".join(f'<template id="dash-{i}">{_dashboard_html._section(b)}</template>'
                          for i, b in enumerate(boards))
    return _PAGE.format(
        title=html.escape(title, quote=True),
        prompt="" if meta.get("prompt", "") == title else html.escape(str(meta["prompt"]), quote=True),
        style=_dashboard_html.STYLE + _asset("viewer.css"), data=payload, templates=templates,
        shade=_dashboard_html.SCRIPT, script=_asset("viewer.js"))


def save_graph_html(graph_json: Mapping[str, Any], path: str | Path,
                    dashboards: Mapping | None = None, title: str | None = None) -> Path:
    """Write `graph_html(graph_json, dashboards, title)` to `path` atomically; returns the path."""
    return _atomic.write_text(path, graph_html(graph_json, dashboards, title))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,">
<style>{style}</style></head>
<body>
<header><h1>{title}</h1><p class="prompt">{prompt}</p>
<p class="legend"><span class="key feature"></span>feature <span class="key error"></span>error
<span class="key embedding"></span>embedding <span class="key logit"></span>logit
<span class="key pos"></span>positive edge <span class="key neg"></span>negative edge
&middot; hover for details, click a feature for its dashboard, shift-click to pin</p></header>
<div id="app">
<div id="graph-wrap"><svg id="graph" role="img" aria-label="attribution graph"></svg></div>
<aside id="side">
<section id="details"><h2>Node</h2><div id="details-body"><p>Click a node.</p></div>
<button id="pin-button" type="button" disabled>Pin</button></section>
<section id="subgraph"><h2>Pinned subgraph (<span id="pin-count">0</span>)</h2>
<label><input type="checkbox" id="only-pinned"> show only the pinned nodes</label>
<button id="clear-pins" type="button">Clear</button>
<ul id="pinned"></ul><p>ids: <code id="pinned-ids"></code></p></section>
<section id="dashboard"><h2>Feature dashboard</h2><div id="dashboard-body"><p>Click a feature node.</p></div>
</section>
</aside></div>
<div id="tooltip" hidden></div>
<script type="application/json" id="graph-data">{data}</script>
{templates}
<script>function shadeDashboards() {{{shade}}}</script>
<script>{script}</script>
</body></html>
"""


def _checked(graph_json: Any) -> dict:
    """A plain copy of the graph's JSON with each node's kind and parsed layer added; raises on bad input."""
    if not isinstance(graph_json, Mapping):
        raise InputError(f"graph_json must be a dict (circuit-tracer's frontend JSON); found "
                         f"{type(graph_json).__name__}. Pass the dict of `frontend_json(graph, slug)`, or "
                         "`json.load` of a <slug>.json file.")
    missing = [k for k in REQUIRED if k not in graph_json]
    if missing:
        raise InputError(f"graph_json lacks {', '.join(map(repr, missing))}; found keys "
                         f"{sorted(graph_json)}. Schema version 1 has 'metadata', 'qParams', 'nodes' and "
                         "'links' (`jaxlens.graphs.export.frontend_json` writes it).")
    meta, nodes, links = graph_json["metadata"], graph_json["nodes"], graph_json["links"]
    q = graph_json.get("qParams") or {}
    for name, value, kind in (("metadata", meta, Mapping), ("qParams", q, Mapping), ("nodes", nodes, list),
                              ("links", links, list)):
        if not isinstance(value, kind):
            raise InputError(f"graph_json[{name!r}] must be a {'dict' if kind is Mapping else 'list'}; found "
                             f"{type(value).__name__}.")
    tokens = meta.get("prompt_tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise InputError("metadata['prompt_tokens'] must be a list of strings (each token decoded); found "
                         f"{tokens!r:.200}.")
    out_nodes, ids = [], {}
    for i, node in enumerate(nodes):
        out_nodes.append(_node(node, i, len(tokens)))
        nid = out_nodes[-1]["node_id"]
        if nid in ids:
            raise InputError(f"nodes[{i}] and nodes[{ids[nid]}] share node_id {nid!r}; node ids must be "
                             "unique.")
        ids[nid] = i
    out_links = []
    for i, link in enumerate(links):
        if not isinstance(link, Mapping) or not {"source", "target", "weight"} <= set(link):
            raise InputError(f"links[{i}] must be a dict with 'source', 'target' and 'weight'; found "
                             f"{link!r:.200}.")
        for end in ("source", "target"):
            _known(link[end], ids, f"links[{i}][{end!r}]")
        weight = _number(link["weight"], f"links[{i}]['weight']")
        out_links.append({"source": link["source"], "target": link["target"], "weight": weight})
    pinned = q.get("pinnedIds", [])
    if isinstance(pinned, str):  # circuit-tracer's URL form: comma-separated
        pinned = [p for p in pinned.split(",") if p]
    if not isinstance(pinned, list):
        raise InputError(f"qParams['pinnedIds'] must be a list of node ids; found {pinned!r:.200}.")
    for p in pinned:
        _known(p, ids, "qParams['pinnedIds']")
    clicked = q.get("clickedId") or ""
    if clicked:
        _known(clicked, ids, "qParams['clickedId']")
    return {"metadata": {"prompt_tokens": tokens, **{k: v for k, v in meta.items() if k != "prompt_tokens"}},
            "qParams": {**q, "pinnedIds": list(pinned), "clickedId": clicked},
            "nodes": out_nodes, "links": out_links}


def _node(node: Any, i: int, n_tokens: int) -> dict:
    if not isinstance(node, Mapping):
        raise InputError(f"nodes[{i}] must be a dict; found {type(node).__name__}.")
    missing = [f for f in NODE_FIELDS if f not in node]
    if missing:
        raise InputError(f"nodes[{i}] lacks {', '.join(map(repr, missing))}; found keys {sorted(node)}. Each "
                         f"node needs {', '.join(NODE_FIELDS)} (RESEARCH.md 1.9).")
    nid, ftype, layer, pos = (node[f] for f in NODE_FIELDS)
    if not isinstance(nid, str) or not nid:
        raise InputError(f"nodes[{i}]['node_id'] must be a non-empty string; found {nid!r}.")
    if ftype not in KINDS:
        raise InputError(f"Node {nid!r} has feature_type {ftype!r}; the viewer knows {sorted(KINDS)}.")
    kind = KINDS[ftype]
    if kind == "embedding":
        row = -1
    elif isinstance(layer, str) and layer.isdigit():
        row = int(layer)
    else:
        raise InputError(f"Node {nid!r} has layer {layer!r}; expected a layer number as a string ('E' only "
                         "for embedding nodes).")
    if isinstance(pos, bool) or not isinstance(pos, int | np.integer) or pos < 0:
        raise InputError(f"Node {nid!r} has ctx_idx {pos!r}; expected a position >= 0.")
    if n_tokens and pos >= n_tokens:
        raise InputError(f"Node {nid!r} sits at ctx_idx {pos}, but metadata['prompt_tokens'] has {n_tokens} "
                         "tokens.")
    out = {k: v for k, v in node.items() if k not in NODE_FIELDS}
    for field in ("activation", "influence", "token_prob"):
        if out.get(field) is not None:
            out[field] = _number(out[field], f"node {nid!r}'s {field!r}")
    m = _FEATURE_ID.fullmatch(nid) if kind == "feature" else None
    return {**out, "node_id": nid, "feature_type": ftype, "layer": str(layer), "ctx_idx": int(pos),
            "kind": kind, "row": row, "feature_index": int(m.group(2)) if m else None}


def _dashboards(dashboards: Any, nodes: list[dict]) -> tuple[list[FeatureDashboard], dict[str, str]]:
    """(the distinct dashboards, node_id -> the id of its <template>)."""
    if not dashboards:
        return [], {}
    if not isinstance(dashboards, Mapping):
        raise InputError(f"dashboards must be a dict keyed by node_id or (layer, feature); found "
                         f"{type(dashboards).__name__}.")
    features = [n for n in nodes if n["kind"] == "feature"]
    by_id = {n["node_id"]: n for n in features}
    boards, dash_of = [], {}
    for key, board in dashboards.items():
        if not isinstance(board, FeatureDashboard):
            raise InputError(f"dashboards[{key!r}] must be a FeatureDashboard (made by jaxlens.dictionaries."
                             f"dashboard.feature_dashboards); found {type(board).__name__}.")
        if isinstance(key, str):
            _known(key, by_id, "a dashboards key (feature node ids)")
            targets = [by_id[key]]
        elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int | np.integer) for k in key):
            targets = [n for n in features if (n["row"], n["feature_index"]) == (int(key[0]), int(key[1]))]
            if not targets:
                raise InputError(f"dashboards key {key!r} (layer, feature) matches no feature node of the "
                                 "graph. Drop it, or key the dashboard by one of the graph's feature node "
                                 "ids.")
        else:
            raise InputError(f"A dashboards key must be a node_id string or a (layer, feature) pair of ints; "
                             f"found {key!r}.")
        for n in targets:
            if n["feature_index"] is not None and n["feature_index"] != board.feature:
                raise InputError(f"dashboards[{key!r}] shows feature {board.feature}, but node "
                                 f"{n['node_id']!r} is feature {n['feature_index']}. Key each dashboard by "
                                 "its own feature.")
            dash_of[n["node_id"]] = f"dash-{len(boards)}"
        boards.append(board)
    return boards, dash_of


def _known(nid: Any, ids: Mapping[str, Any], where: str) -> None:
    if not isinstance(nid, str) or nid not in ids:
        close = difflib.get_close_matches(str(nid), list(ids), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InputError(f"{where} names node {nid!r}, which is not in the graph's nodes.{hint} Every link "
                         "and pin must refer to a node_id in graph_json['nodes'].")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
            or not math.isfinite(float(value)):
        raise InputError(f"{where} must be a finite number; found {value!r}.")
    return float(value)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values (json.dumps's `default`)."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _asset(name: str) -> str:
    return resources.files("jaxlens.graphs").joinpath("_viewer", name).read_text(encoding="utf-8")
