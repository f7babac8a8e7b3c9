"""Pieces several family converters share: activation names, rotary settings, attention windows, the HF Linear
layouts (`[out, in]`) as TransformerLens weights, and the unembedding of tied or untied checkpoints.

Every helper raises CheckpointError naming the family, the config key and what to do, never guesses.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import einops
import numpy as np

from jaxlens.converters._checkpoint import TensorSource
from jaxlens.errors import CheckpointError

# Hugging Face `ACT2FN` names -> Config.act_fn (same function, to float error).
ACT_FNS = {
    "gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "gelu": "gelu",
    "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu",
}

# Config keys that only describe rotary embeddings (read by `rope_settings`).
ROPE_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"})


def act_fn(name: str | None, family: str, key: str = "hidden_act") -> str:
    """The Config.act_fn for a Hugging Face activation name."""
    if name not in ACT_FNS:
        raise CheckpointError(
            f"{family}: activation {key}={name!r} is not supported; jaxlens knows {sorted(ACT_FNS)}."
        )
    return ACT_FNS[name]


def rope_settings(
    hf: Mapping[str, Any],
    family: str,
    *,
    theta: float = 10000.0,
    partial: float = 1.0,
    allowed: Sequence[str] = ("default",),
) -> tuple[float, float, tuple | None]:
    """(rotary base, partial rotary factor, Config.rotary_scaling) from a config of any transformers version.

    transformers 5 writes `rope_parameters` {rope_type, rope_theta, partial_rotary_factor, ...}; older configs
    have top-level `rope_theta`, `partial_rotary_factor` and a `rope_scaling` dict (or null). `theta` and
    `partial` are the family's defaults. Rope types outside `allowed` ("default", "llama3") are refused.
    """
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, Mapping) for v in rp.values()):
        raise CheckpointError(f"{family}: per-layer-type rope_parameters {sorted(rp)} are not supported.")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in allowed:
        raise CheckpointError(
            f"{family}: rope scaling type {kind!r} is not supported (jaxlens handles {list(allowed)} here). "
            "Use a checkpoint without rope scaling, or add the scaling as a Config field."
        )
    base = float(rp.get("rope_theta", hf.get("rope_theta", theta)))
    factor = float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", partial)))
    scaling = None
    if kind == "llama3":
        try:
            scaling = (float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                       int(rp["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(
                f"{family}: llama3 rope scaling needs {e.args[0]!r}, missing from {rp}.") from None
    return base, factor, scaling


def rotary_dim(d_head: int, factor: float, family: str) -> int:
    """Rotating dims per head, int(d_head * factor) as Hugging Face computes it; must be even."""
    dim = int(d_head * factor)
    if dim <= 0 or dim % 2:
        raise CheckpointError(f"{family}: partial rotary factor {factor} of d_head={d_head} gives {dim} "
                              "rotary dims; jaxlens needs a positive even number.")
    return dim


def window_sizes(kinds: Sequence[str], window: int | None, family: str,
                 n_layers: int) -> tuple[int | None, ...] | None:
    """Config.window_sizes from per-layer kinds ("sliding_attention"/"local" vs "full_attention"/"global")."""
    if len(kinds) != n_layers:
        raise CheckpointError(
            f"{family}: {len(kinds)} attention layer types {list(kinds)} for {n_layers} layers.")
    local = {"sliding_attention", "local"}
    unknown = sorted(set(kinds) - local - {"full_attention", "global"})
    if unknown:
        raise CheckpointError(f"{family}: unknown attention layer type(s) {unknown}.")
    if not any(k in local for k in kinds):
        return None
    if not isinstance(window, int) or window <= 0:
        raise CheckpointError(
            f"{family}: sliding-window layers need a positive int window size, found {window!r}.")
    return tuple(window if k in local else None for k in kinds)


def linear_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Stacked HF Linear weights [layer, heads*d_head, d_model] -> W_Q/K/V [layer, heads, d_model, d_head]."""
    return einops.rearrange(w, "l (h e) d -> l h d e", h=n_heads)


def bias_heads(b: np.ndarray, n_heads: int) -> np.ndarray:
    """[layer, heads*d_head] -> [layer, heads, d_head]."""
    return einops.rearrange(b, "l (h e) -> l h e", h=n_heads)


def out_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Stacked HF output projections [layer, d_model, heads*d_head] -> W_O [layer, heads, d_head, d_model]."""
    return einops.rearrange(w, "l d (h e) -> l h e d", h=n_heads)


def transpose(w: np.ndarray) -> np.ndarray:
    """Stacked HF Linear weights [layer, out, in] -> [layer, in, out] (W_in, W_gate, W_out)."""
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def unembed_weight(t: TensorSource, name: str, W_E: np.ndarray, hf: Mapping[str, Any], family: str,
                   tied_default: bool) -> np.ndarray:
    """W_U [d_model, d_vocab]: the checkpoint's `name` when present, else the tied (unscaled) embedding.

    Raises:
        CheckpointError: the head is missing although the config says the embeddings are not tied.
    """
    if t.has(name):
        return np.ascontiguousarray(t.take(name, W_E.shape).T)
    if not hf.get("tie_word_embeddings", tied_default):
        raise CheckpointError(
            f"{t.origin}: {family} config has tie_word_embeddings=False but the checkpoint has no {name!r}. "
            "The output head is missing: save the full model (not only the base model)."
        )
    return np.ascontiguousarray(W_E.T)


def require_false(hf: Mapping[str, Any], keys: Sequence[str], family: str) -> None:
    """Refuse options that change the architecture in ways jaxlens does not model when they are set."""
    on = [k for k in keys if hf.get(k)]
    if on:
        raise CheckpointError(f"{family}: config option(s) {on} are set; jaxlens does not support them.")
