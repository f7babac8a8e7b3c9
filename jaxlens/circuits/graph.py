"""The graph circuit discovery searches: residual-stream writers, readers, and the edges between them.

Nodes (Syed et al. 2023, EAP; Hanna et al. 2024, EAP-IG; Conmy et al. 2023, ACDC) are named by the
TransformerLens hook points where they write and read:

- sources (writers), in forward order: the input `blocks.0.hook_resid_pre` (token and position embeddings),
  then per layer every head `blocks.{l}.attn.hook_result[h]` and the MLP `blocks.{l}.hook_mlp_out`;
- destinations (readers), per layer: every head's query input `blocks.{l}.hook_q_input[h]`, the key and value
  inputs `blocks.{l}.hook_k_input[j]` / `hook_v_input[j]` of every key/value head j (under grouped-query
  attention one k and one v input serves n_heads / n_key_value_heads query heads), the MLP's input
  `blocks.{l}.hook_mlp_in`, and finally the logits, which read `blocks.{L-1}.hook_resid_post`.

An edge joins every source to every later reader: heads of layer l feed the MLP of layer l in sequential
blocks but not in parallel ones (GPT-J, NeoX, Phi: the MLP reads what attention reads).

    graph = Graph.from_model(model)
    graph.counts                 # {"sources": ..., "destinations": ..., "edges": ...}
    scored = graph.with_scores(scores).top_n(200)
    scored.edge_names(in_graph=True)[:3]
    Graph.from_json(scored.to_json())
"""

import dataclasses
import difflib
import heapq
import json
from collections.abc import Iterable, Sequence

import numpy as np

from jaxlens.config import Config
from jaxlens.errors import InputError, JaxlensError


class UnsupportedModelError(JaxlensError, ValueError):
    """A model whose blocks the circuit graph does not describe (encoders, post-norm blocks)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Index arithmetic of the graph of one architecture (sizes only: hashable, static under jit).

    Source index: input 0; head h of layer l `1 + l (H + 1) + h`; MLP of layer l `1 + l (H + 1) + H`.
    Destination index: layer l's block of P = H + 2 KV + 1 readers starts at `l P`: queries (H), keys (KV),
    values (KV), the MLP input; the logits are last (`L P`).
    """

    n_layers: int
    n_heads: int
    n_kv: int
    parallel: bool

    @property
    def n_src(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv + 1

    @property
    def n_dst(self) -> int:
        return self.n_layers * self.per_layer + 1

    def head_src(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1)

    def mlp_src(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def src_layer(self) -> np.ndarray:
        """[n_src] the layer of each source (-1 for the input)."""
        return np.concatenate([[-1], np.repeat(np.arange(self.n_layers), self.n_heads + 1)])

    def real(self) -> np.ndarray:
        """[n_src, n_dst] True where the source is upstream of the reader."""
        L, P = self.n_layers, self.per_layer
        src_layer = self.src_layer()
        is_mlp_src = np.zeros(self.n_src, bool)
        is_mlp_src[[self.mlp_src(l) for l in range(L)]] = True
        dst_layer = np.concatenate([np.repeat(np.arange(L), P), [L]])
        dst_is_mlp = np.concatenate([np.tile(np.arange(P) == P - 1, L), [False]])
        earlier = src_layer[:, None] < dst_layer[None, :]
        same_layer_heads = ((src_layer[:, None] == dst_layer[None, :]) & ~is_mlp_src[:, None]
                            & dst_is_mlp[None, :])
        return earlier | (same_layer_heads if not self.parallel else False)

    def dst_owner(self) -> list[tuple[int, ...]]:
        """For each destination, the source nodes it feeds (the head(s) or MLP reading it; () for logits)."""
        H, KV, r = self.n_heads, self.n_kv, self.n_heads // self.n_kv
        out: list[tuple[int, ...]] = []
        for l in range(self.n_layers):
            hs = self.head_src(l)
            out += [(hs + h,) for h in range(H)]
            out += [tuple(hs + j * r + i for i in range(r)) for j in range(KV)] * 2
            out.append((self.mlp_src(l),))
        return out + [()]


def layout_of(cfg: Config) -> Layout:
    """The graph layout of a decoder config.

    Raises:
        UnsupportedModelError: an encoder (bidirectional attention) or a model with norms after each
            sublayer (Gemma 2's ln1_post / ln2_post: the per-head outputs are not additive in the residual).
    """
    if cfg.attention_dir != "causal":
        raise UnsupportedModelError(
            "The circuit graph covers decoder-only models; this config has attention_dir="
            f"{cfg.attention_dir!r} (an encoder). Use a causal decoder.")
    if cfg.use_normalization_before_and_after:
        raise UnsupportedModelError(
            "The circuit graph needs each head's output to be an additive term of the residual stream; this "
            "model normalises each sublayer's output (use_normalization_before_and_after=True, e.g. Gemma "
            "2), so per-head outputs do not add up. Edge patching of post-norm blocks is not supported yet.")
    return Layout(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.parallel_attn_mlp)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Edges of a model's graph with their scores and which are in the circuit.

    Attributes:
        layout: index arithmetic (`Layout`).
        edge_src, edge_dst: [n_edges] source and destination index of each edge (forward order).
        scores: [n_edges] float32 scores, or None before attribution.
        in_graph: [n_edges] True for edges of the circuit (all of them for a fresh graph).
        method: how the scores were computed ("" for none).
    """

    layout: Layout
    edge_src: np.ndarray
    edge_dst: np.ndarray
    scores: np.ndarray | None
    in_graph: np.ndarray
    method: str = ""

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config) -> "Graph":
        """Every edge of the decoder `cfg`, all in the circuit, unscored."""
        layout = layout_of(cfg)
        src, dst = np.nonzero(layout.real())
        return cls(layout, src.astype(np.int32), dst.astype(np.int32), None, np.ones(len(src), bool))

    @classmethod
    def from_model(cls, model) -> "Graph":
        """`from_config(model.cfg)` for a HookedTransformer (or anything with a decoder `cfg`).

        Raises:
            UnsupportedModelError: a model the graph does not cover (see `layout_of`).
        """
        cfg = getattr(model, "cfg", None)
        if not isinstance(cfg, Config) or type(model).__name__ == "HookedEncoder":
            raise UnsupportedModelError(
                f"Circuit graphs are built for decoder models (HookedTransformer); found a "
                f"{type(model).__name__}. Load a decoder with HookedTransformer.from_pretrained.")
        return cls.from_config(cfg)

    def replace(self, **changes) -> "Graph":
        return dataclasses.replace(self, **changes)

    def with_scores(self, scores, method: str = "") -> "Graph":
        """A copy holding `scores` [n_edges] (in the order of `edge_names()`)."""
        scores = np.asarray(scores, np.float32).reshape(-1)
        if scores.shape != (self.n_edges,):
            raise InputError(f"scores must have one value per edge ({self.n_edges}); found {scores.size}.")
        return self.replace(scores=scores, method=method or self.method)

    # -- names and counts --------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return len(self.edge_src)

    @property
    def counts(self) -> dict[str, int]:
        """Sources, destinations, edges, edges in the circuit and source nodes in it."""
        return {"sources": self.layout.n_src, "destinations": self.layout.n_dst, "edges": self.n_edges,
                "edges_in_graph": int(self.in_graph.sum()), "nodes_in_graph": len(self.nodes(True))}

    def src_names(self) -> list[str]:
        """Hook names of the sources in index order."""
        lo = self.layout
        out = ["blocks.0.hook_resid_pre"]
        for l in range(lo.n_layers):
            out += [f"blocks.{l}.attn.hook_result[{h}]" for h in range(lo.n_heads)]
            out.append(f"blocks.{l}.hook_mlp_out")
        return out

    def dst_names(self) -> list[str]:
        """Hook names of the destinations in index order."""
        lo = self.layout
        out = []
        for l in range(lo.n_layers):
            out += [f"blocks.{l}.hook_q_input[{h}]" for h in range(lo.n_heads)]
            out += [f"blocks.{l}.hook_{w}_input[{j}]" for w in "kv" for j in range(lo.n_kv)]
            out.append(f"blocks.{l}.hook_mlp_in")
        return out + [f"blocks.{lo.n_layers - 1}.hook_resid_post"]

    def src_labels(self) -> list[str]:
        """Short labels of the sources (EAP-IG's): input, a{l}.h{h}, m{l}."""
        lo = self.layout
        out = ["input"]
        for l in range(lo.n_layers):
            out += [f"a{l}.h{h}" for h in range(lo.n_heads)] + [f"m{l}"]
        return out

    def dst_labels(self) -> list[str]:
        """Short labels of the destinations: a{l}.h{h}<q>, a{l}.kv{j}<k>, a{l}.kv{j}<v>, m{l}, logits."""
        lo = self.layout
        out = []
        for l in range(lo.n_layers):
            out += [f"a{l}.h{h}<q>" for h in range(lo.n_heads)]
            out += [f"a{l}.kv{j}<{w}>" for w in "kv" for j in range(lo.n_kv)]
            out.append(f"m{l}")
        return out + ["logits"]

    def edge_names(self, in_graph: bool = False) -> list[str]:
        """`source->destination` hook names of every edge (only the circuit's with `in_graph`)."""
        s, d = self.src_names(), self.dst_names()
        keep = self.in_graph if in_graph else np.ones(self.n_edges, bool)
        return [f"{s[a]}->{d[b]}" for a, b, k in zip(self.edge_src, self.edge_dst, keep, strict=True) if k]

    def edge_labels(self, in_graph: bool = False) -> list[str]:
        """Short `a0.h1->m2` labels of every edge (only the circuit's with `in_graph`)."""
        s, d = self.src_labels(), self.dst_labels()
        keep = self.in_graph if in_graph else np.ones(self.n_edges, bool)
        return [f"{s[a]}->{d[b]}" for a, b, k in zip(self.edge_src, self.edge_dst, keep, strict=True) if k]

    def edge_index(self, names: Iterable[str]) -> np.ndarray:
        """Edge numbers of `names` (hook-name or short-label form).

        Raises:
            InputError: a name that is not an edge of this graph (close matches suggested).
        """
        lookup = {n: i for i, n in enumerate(self.edge_names())}
        lookup.update({n: i for i, n in enumerate(self.edge_labels())})
        out = []
        for n in names:
            if n not in lookup:
                close = difflib.get_close_matches(n, list(lookup), n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise InputError(
                    f"The graph has no edge {n!r}.{hint} Edges join a source to a later reader; list them "
                    "with graph.edge_names() (or graph.edge_labels()).")
            out.append(lookup[n])
        return np.asarray(out, np.int64)

    def nodes(self, in_graph: bool = True) -> list[str]:
        """Short labels of the source nodes with an edge in the circuit (all sources without `in_graph`)."""
        labels = self.src_labels()
        if not in_graph:
            return labels
        used = np.unique(self.edge_src[self.in_graph])
        return [labels[i] for i in used]

    def heads(self) -> list[tuple[int, int]]:
        """(layer, head) of the attention heads with an outgoing edge in the circuit."""
        lo, out = self.layout, []
        for s in np.unique(self.edge_src[self.in_graph]):
            if s == 0:
                continue
            layer, h = divmod(int(s) - 1, lo.n_heads + 1)
            if h < lo.n_heads:
                out.append((layer, h))
        return out

    # -- selection ---------------------------------------------------------------------------------------
    def with_edges(self, names: Sequence[str], prune: bool = False) -> "Graph":
        """The circuit made of exactly the named edges (see `edge_index` for the accepted names)."""
        keep = np.zeros(self.n_edges, bool)
        keep[self.edge_index(names)] = True
        g = self.replace(in_graph=keep)
        return g.prune() if prune else g

    def top_n(self, n: int, absolute: bool = True, prune: bool = True) -> "Graph":
        """The circuit of the n highest-scoring edges (by |score| with `absolute`), then pruned."""
        order = self._order(absolute)
        keep = np.zeros(self.n_edges, bool)
        keep[order[: max(0, int(n))]] = True
        g = self.replace(in_graph=keep)
        return g.prune() if prune else g

    def threshold(self, tau: float, absolute: bool = True, prune: bool = True) -> "Graph":
        """The circuit of edges scoring at least `tau` (|score| with `absolute`), then pruned."""
        s = self._need_scores()
        keep = (np.abs(s) if absolute else s) >= tau
        g = self.replace(in_graph=keep)
        return g.prune() if prune else g

    def greedy(self, n: int, absolute: bool = True, prune: bool = True) -> "Graph":
        """Grow a circuit from the logits: repeatedly add the best-scoring edge whose reader already belongs
        to the circuit (the logits, or a node with an edge out of it in the circuit), n edges in all."""
        s = self._need_scores()
        key = np.nan_to_num(-np.abs(s) if absolute else -s, nan=np.inf)
        lo = self.layout
        owner = lo.dst_owner()
        dsts_of = [[] for _ in range(lo.n_src)]  # source node -> the destinations that feed it
        for d, nodes in enumerate(owner):
            for node in nodes:
                dsts_of[node].append(d)
        into = [[] for _ in range(lo.n_dst)]
        for e, d in enumerate(self.edge_dst):
            into[d].append(e)
        heap = [(key[e], e) for e in into[lo.n_dst - 1]]
        heapq.heapify(heap)
        keep, reached = np.zeros(self.n_edges, bool), set()
        while heap and keep.sum() < n:
            _, e = heapq.heappop(heap)
            if keep[e]:
                continue
            keep[e] = True
            src = int(self.edge_src[e])
            if src not in reached:
                reached.add(src)
                for d in dsts_of[src]:
                    for e2 in into[d]:
                        heapq.heappush(heap, (key[e2], e2))
        g = self.replace(in_graph=keep)
        return g.prune() if prune else g

    def prune(self) -> "Graph":
        """Drop circuit edges that lie on no path from the input to the logits."""
        lo, keep = self.layout, self.in_graph.copy()
        owner = lo.dst_owner()
        dst_nodes = [set(o) for o in owner]
        # forward: sources reached from the input through circuit edges, in index (topological) order
        reach = np.zeros(lo.n_src, bool)
        reach[0] = True
        dst_reached = np.zeros(lo.n_dst, bool)
        order = np.argsort(self.edge_src, kind="stable")
        # sources are processed in forward order; a destination at layer l is reached only from earlier ones
        by_src = {}
        for e in order:
            if keep[e]:
                by_src.setdefault(int(self.edge_src[e]), []).append(e)
        for s_idx in range(lo.n_src):
            if not reach[s_idx]:
                continue
            for e in by_src.get(s_idx, ()):
                d = int(self.edge_dst[e])
                dst_reached[d] = True
                for node in dst_nodes[d]:
                    reach[node] = True
        # backward: sources that reach the logits
        alive = np.zeros(lo.n_src, bool)
        dst_alive = np.zeros(lo.n_dst, bool)
        dst_alive[lo.n_dst - 1] = True
        for s_idx in range(lo.n_src - 1, -1, -1):
            fed = [int(self.edge_dst[e]) for e in by_src.get(s_idx, ())]
            alive[s_idx] = any(dst_alive[d] for d in fed)
            if alive[s_idx]:
                for d, nodes in enumerate(owner):
                    if s_idx in nodes:
                        dst_alive[d] = True
        ok = keep & reach[self.edge_src] & dst_reached[self.edge_dst] & dst_alive[self.edge_dst]
        ok &= alive[self.edge_src]
        return self.replace(in_graph=ok)

    def _need_scores(self) -> np.ndarray:
        if self.scores is None:
            raise InputError("This graph has no scores yet: score it with jaxlens.circuits.attribute_edges "
                             "(or graph.with_scores(values)) before selecting edges by score.")
        return self.scores

    def _order(self, absolute: bool) -> np.ndarray:
        s = self._need_scores()
        key = np.nan_to_num(np.abs(s) if absolute else s, nan=-np.inf)  # unscored (NaN) edges last
        return np.argsort(-key, kind="stable")

    # -- serialisation -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """JSON: the layout, and every edge by name with its score and membership."""
        scores = [None] * self.n_edges if self.scores is None else [float(x) for x in self.scores]
        edges = {n: {"score": s, "in_graph": bool(k)}
                 for n, s, k in zip(self.edge_names(), scores, self.in_graph, strict=True)}
        return json.dumps({"layout": dataclasses.asdict(self.layout), "method": self.method,
                           "edges": edges})

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        """The graph written by `to_json`.

        Raises:
            InputError: JSON that is not a circuit graph, or that names edges its layout lacks.
        """
        try:
            data = json.loads(text)
            layout = Layout(**data["layout"])
            edges = data["edges"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"Not a circuit graph's JSON ({e}); write one with Graph.to_json().") from e
        src, dst = np.nonzero(layout.real())
        g = cls(layout, src.astype(np.int32), dst.astype(np.int32), None, np.zeros(len(src), bool),
                data.get("method", ""))
        idx = g.edge_index(edges)
        if len(idx) != g.n_edges:
            raise InputError(f"The JSON lists {len(idx)} edges; a graph of this layout has {g.n_edges}.")
        in_graph = np.zeros(g.n_edges, bool)
        in_graph[idx] = [bool(v["in_graph"]) for v in edges.values()]
        vals = [v["score"] for v in edges.values()]
        scores = None
        if any(v is not None for v in vals):
            scores = np.zeros(g.n_edges, np.float32)
            scores[idx] = [np.nan if v is None else v for v in vals]
        return g.replace(in_graph=in_graph, scores=scores)
