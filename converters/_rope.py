"""Rope scaling of a Hugging Face config as Config fields: every `rope_type` transformers computes once per
model (default, linear, llama3, YaRN) or per call (dynamic NTK), and a clear error naming any other.

transformers 5 keeps the settings in `rope_parameters` ({rope_type, rope_theta, factor, ...}); older configs
in `rope_theta` plus a `rope_scaling` dict (`type` or `rope_type`). The frequencies follow transformers'
`modeling_rope_utils` (Peng et al. 2023 "YaRN"; bloc97 / emozilla's NTK-aware scaling for dynamic):

- linear: the default frequencies divided by `factor` -> `Config.rotary_freqs`;
- llama3: the Llama 3.1 smoothing, computed in the model from `Config.rotary_scaling`;
- yarn: interpolated / extrapolated frequencies blended by a linear ramp -> `rotary_freqs`, and the cos/sin
  scale `attention_factor` -> `Config.rotary_attention_factor`;
- dynamic: the base grows with the sequence length -> `Config.rotary_dynamic_ntk`.

    fields = rope_fields(hf, "llama", d_head=64)      # {"rotary_base": ..., "rotary_dim": ..., ...}
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlens.converters._common import rotary_dim
from jaxlens.errors import CheckpointError

#: Every rope type jaxlens implements.
SUPPORTED = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_fields(hf: Mapping[str, Any], family: str, d_head: int, *, theta: float = 10000.0,
                partial: float = 1.0, allowed: Sequence[str] = SUPPORTED,
                params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config rotary fields (rotary_base, rotary_dim, rotary_scaling, rotary_freqs, rotary_attention_factor,
    rotary_dynamic_ntk) from a Hugging Face config dict.

    Args:
        hf: the config dict.
        family: the converter's name, for messages.
        d_head: the head size the rotary dims are a fraction of.
        theta, partial: the family's default base and partial rotary factor.
        allowed: the rope types this family accepts.
        params: the rope parameters to read instead of the config's own (one entry of a per-layer-type dict).

    Raises:
        CheckpointError: a rope type outside `allowed` (named, with the supported ones), a missing parameter,
            or per-layer-type rope parameters where one set is expected.
    """
    rp = dict(params if params is not None else (hf.get("rope_parameters") or hf.get("rope_scaling") or {}))
    if any(isinstance(v, Mapping) for v in rp.values()):
        raise CheckpointError(f"{family}: per-layer-type rope_parameters {sorted(rp)} are not supported "
                              "here.")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in allowed:
        raise CheckpointError(
            f"{family}: rope scaling type {kind!r} is not implemented; jaxlens implements {list(allowed)} "
            f"for this family. Use a checkpoint with one of those, or add {kind!r} to converters/_rope.py."
        )
    base = float(rp.get("rope_theta", hf.get("rope_theta", theta)))
    dim = rotary_dim(d_head, float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", partial))),
                     family)
    out: dict[str, Any] = dict(rotary_base=base, rotary_dim=dim, rotary_scaling=None, rotary_freqs=None,
                               rotary_attention_factor=1.0, rotary_dynamic_ntk=None)
    need = lambda key: _need(rp, key, kind, family)  # noqa: E731
    if kind == "linear":
        out["rotary_freqs"] = tuple((default_freqs(base, dim) / np.float32(need("factor"))).tolist())
    elif kind == "llama3":
        out["rotary_scaling"] = (float(need("factor")), float(need("low_freq_factor")), float(need(
            "high_freq_factor")), int(need("original_max_position_embeddings")))
    elif kind == "dynamic":
        out["rotary_dynamic_ntk"] = (float(need("factor")), int(hf.get("max_position_embeddings", 2048)))
    elif kind == "yarn":
        freqs, attention_factor = yarn(rp, base, dim, hf, family)
        out["rotary_freqs"], out["rotary_attention_factor"] = tuple(freqs.tolist()), attention_factor
    return out


def default_freqs(base: float, dim: int) -> np.ndarray:
    """1 / base^(2i / dim) for i < dim / 2, in float32 as transformers computes them."""
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return np.float32(1.0) / (np.float32(base) ** exponents)


def yarn(rp: Mapping[str, Any], base: float, dim: int, hf: Mapping[str, Any], family: str
         ) -> tuple[np.ndarray, float]:
    """YaRN's frequencies [dim / 2] and attention factor, as transformers' `_compute_yarn_parameters`."""
    original = rp.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if original is None:
        raise CheckpointError(f"{family}: yarn rope scaling needs original_max_position_embeddings, missing "
                              f"from {dict(rp)}.")
    factor = rp.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original

    def mscale(scale, m=1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    freqs = (np.float32(1.0) / (np.float32(factor) * pos_freqs)) * (1 - extrapolation) + (
        np.float32(1.0) / pos_freqs) * extrapolation
    return freqs.astype(np.float32), float(attention_factor)


def _need(rp: Mapping[str, Any], key: str, kind: str, family: str):
    if rp.get(key) is None:
        raise CheckpointError(f"{family}: {kind} rope scaling needs {key!r}, missing from {dict(rp)}.")
    return rp[key]
