"""Independent references for the circuit tests, from plain forwards with jaxlens interventions (no circuits
code): source outputs from run_with_cache, one Add per patched edge, and a layer-by-layer fixed point for
whole circuits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.interventions import Add
from jaxlens.model.forward import forward

A, W = 3, 5  # the metric: logit of token A minus token W at the last position, mean over the batch


def metric(logits):
    return (logits[:, -1, A] - logits[:, -1, W]).mean()


# -- references from plain forwards ---------------------------------------------------------------------
def _source_names(cfg) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{h}" for l in range(cfg.n_layers)
                                          for h in ("attn.hook_result", "hook_mlp_out")]


@functools.partial(jax.jit, static_argnames="cfg")
def _run(params, cfg, tokens, adds):
    """(metric, cache of the source hooks) of a plain forward with an Add at every reader hook (one compile
    for every set of deltas)."""
    logits, cache = forward(params, cfg, tokens, interventions={k: Add(v) for k, v in adds.items()},
                            cache_names=_source_names(cfg))
    return metric(logits), cache


def zero_adds(cfg, b, p) -> dict:
    """Zero deltas at every reader hook: per layer the split q/k/v inputs and the MLP input, and the last
    layer's resid_post (what the logits read)."""
    d, out = cfg.d_model, {}
    for l in range(cfg.n_layers):
        out[f"blocks.{l}.hook_q_input"] = np.zeros((b, p, cfg.n_heads, d), np.float32)
        out[f"blocks.{l}.hook_k_input"] = np.zeros((b, p, cfg.n_key_value_heads, d), np.float32)
        out[f"blocks.{l}.hook_v_input"] = np.zeros((b, p, cfg.n_key_value_heads, d), np.float32)
        out[f"blocks.{l}.hook_mlp_in"] = np.zeros((b, p, d), np.float32)
    out[f"blocks.{cfg.n_layers - 1}.hook_resid_post"] = np.zeros((b, p, d), np.float32)
    return out


def run_adds(model, tokens, adds: dict) -> tuple[float, dict]:
    """(metric, label -> output of every source) of the model on `tokens` with `adds` at the reader hooks."""
    cfg = model.cfg
    full = zero_adds(cfg, *np.shape(tokens)) | adds
    value, cache = _run(model.params, cfg, jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in full.items()})
    out = {"input": np.asarray(cache["blocks.0.hook_resid_pre"])}
    for l in range(cfg.n_layers):
        res = np.asarray(cache[f"blocks.{l}.attn.hook_result"])
        out |= {f"a{l}.h{h}": res[:, :, h] for h in range(cfg.n_heads)}
        out[f"m{l}"] = np.asarray(cache[f"blocks.{l}.hook_mlp_out"])
    return float(value), out


def source_acts(model, tokens) -> dict:
    """label -> output of every source on `tokens`."""
    return run_adds(model, tokens, {})[1]


def dest_hook(cfg, label) -> tuple[str, int | None, int]:
    """(hook name, head slot or None, layer) where a destination label reads."""
    if label == "logits":
        return f"blocks.{cfg.n_layers - 1}.hook_resid_post", None, cfg.n_layers
    layer = int(label[1:].split(".")[0])
    if label.startswith("m"):
        return f"blocks.{layer}.hook_mlp_in", None, layer
    slot = int(label.split(".")[1][2 if label.split(".")[1].startswith("kv") else 1:].split("<")[0])
    kind = label[-2]
    return f"blocks.{layer}.hook_{kind}_input", slot, layer


def add_at(cfg, adds: dict, hook: str, slot, delta):
    """Accumulate `delta` [batch pos d_model] into the Add for `hook` (at head `slot` if given)."""
    if slot is None:
        adds[hook] = adds.get(hook, 0) + delta
        return
    n = cfg.n_key_value_heads if ("k_input" in hook or "v_input" in hook) else cfg.n_heads
    cur = adds.get(hook, np.zeros(delta.shape[:2] + (n, delta.shape[-1]), np.float32))
    cur = cur.copy()
    cur[:, :, slot] += delta
    adds[hook] = cur


def metric_with_adds(model, tokens, adds: dict) -> float:
    return run_adds(model, tokens, adds)[0]


def reference_masked_metric(model, clean, corrupted, graph, keep) -> float:
    """The metric with the edges where `keep` is False patched, by fixed-point iteration over layers: each
    pass runs a plain forward with Add interventions at the readers, computed from the source outputs of the
    previous pass; after 2 n_layers + 1 passes every reader's input is final."""
    cfg = model.cfg
    corr = source_acts(model, corrupted)
    s_lab, d_lab = graph.src_labels(), graph.dst_labels()
    cur = source_acts(model, clean)
    value = None
    for _ in range(2 * cfg.n_layers + 1):  # heads, then the MLP that reads them, layer by layer
        adds = {}
        for e in np.nonzero(~np.asarray(keep))[0]:
            s, d = s_lab[graph.edge_src[e]], d_lab[graph.edge_dst[e]]
            hook, slot, _ = dest_hook(cfg, d)
            add_at(cfg, adds, hook, slot, corr[s] - cur[s])
        value, cur = run_adds(model, clean, adds)
    return value
