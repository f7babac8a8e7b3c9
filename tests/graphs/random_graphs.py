"""Attribution graphs built by hand for the pruning and export tests (no model, no `attribute()`).

`random_graph` draws an adjacency with the zero structure of ../shared/RESEARCH.md 1.3: a feature at
(layer, pos) reads only features and errors of earlier layers and tokens, all at positions <= pos; the logit
nodes read everything; error and token rows and logit columns are zero; the special prefix (position 0) has
no features and its error columns are zero. `hand_graph` wraps an adjacency written out in a test.
"""

import numpy as np

from jaxlens.graphs import AttributionGraph


def hand_graph(features, adjacency, *, n_layers, n_pos, logit_probabilities, tokens=None, **kw):
    """An AttributionGraph with every listed (layer, pos, feature) active and selected, activation 1 + i."""
    features = np.asarray(features, np.int64).reshape(-1, 3)
    n_logits = len(logit_probabilities)
    tokens = np.arange(10, 10 + n_pos, dtype=np.int64) if tokens is None else np.asarray(tokens, np.int64)
    return AttributionGraph(
        prompt="hand made", tokens=tokens, token_strings=[f"t{i}" for i in range(n_pos)],
        active_features=features, activation_values=np.arange(1, len(features) + 1, dtype=np.float32),
        selected_features=np.arange(len(features)), adjacency=np.asarray(adjacency, np.float32),
        logit_tokens=np.arange(100, 100 + n_logits, dtype=np.int64),
        logit_probabilities=np.asarray(logit_probabilities, np.float32),
        logit_strings=[f" out{i}" for i in range(n_logits)], n_layers=n_layers, vocab_size=500,
        model_name="hand", transcoder_name="hand-transcoders", **kw)


def random_graph(seed: int, *, n_layers: int = 3, n_pos: int = 5, n_logits: int = 3, d_transcoder: int = 40,
                 per_site: int = 4, keep_fraction: float = 0.8, density: float = 0.5) -> AttributionGraph:
    """A random graph: `per_site` active features at most per (layer, pos >= 1), a random `keep_fraction`
    of them selected, each allowed edge present with probability `density`."""
    rng = np.random.default_rng(seed)
    active = sorted((layer, pos, int(f)) for layer in range(n_layers) for pos in range(1, n_pos)
                    for f in rng.choice(d_transcoder, rng.integers(0, per_site + 1), replace=False))
    active = np.asarray(active, np.int64).reshape(-1, 3)
    selected = np.sort(rng.choice(len(active), max(1, int(keep_fraction * len(active))), replace=False))
    feats = active[selected]
    # (kind, layer, pos) of every node in circuit-tracer's order
    nodes = [("feature", int(l), int(p)) for l, p, _ in feats]
    nodes += [("error", l, p) for l in range(n_layers) for p in range(n_pos)]
    nodes += [("token", -1, p) for p in range(n_pos)] + [("logit", n_layers, n_pos - 1)] * n_logits
    n = len(nodes)
    allowed = np.zeros((n, n), bool)
    for t, (tkind, tl, tp) in enumerate(nodes):
        if tkind not in ("feature", "logit"):
            continue  # error and token rows are zero
        for s, (skind, sl, sp) in enumerate(nodes):
            if skind == "logit" or sp > tp:
                continue  # logit columns are zero; attention is causal
            if skind == "error" and sp == 0:
                continue  # the prefix's error vector is zeroed
            allowed[t, s] = skind == "token" or sl < tl
    weights = rng.normal(size=(n, n)) * rng.lognormal(size=(n, 1))
    adjacency = np.where(allowed & (rng.random((n, n)) < density), weights, 0).astype(np.float32)
    probs = np.sort(rng.dirichlet(np.ones(n_logits + 1))[:n_logits])[::-1].astype(np.float32)
    return AttributionGraph(
        prompt="a random prompt", tokens=rng.integers(0, 300, n_pos),
        token_strings=[f" w{i}" for i in range(n_pos)], active_features=active,
        activation_values=rng.lognormal(size=len(active)).astype(np.float32), selected_features=selected,
        adjacency=adjacency, logit_tokens=rng.choice(300, n_logits, replace=False),
        logit_probabilities=probs, logit_strings=[f" y{i}" for i in range(n_logits)], n_layers=n_layers,
        vocab_size=300, model_name="random-model", transcoder_name="random-transcoders")
