"""Rotary position embeddings (Su et al. 2021, "RoFormer").

Two layouts, chosen by `cfg.rotary_adjacent_pairs`: rotate halves (GPT-NeoX, Llama: dims i and i + R/2 form a
pair) or adjacent pairs (GPT-J: dims 2i and 2i+1). Only the first `cfg.rotary_dim` dims of each head rotate.
The frequencies come from the base (`rotary_base`), scaled as Llama 3 (`rotary_scaling`), given outright
(`rotary_freqs`: linear, YaRN) or grown with the sequence length (`rotary_dynamic_ntk`, as transformers'
dynamic NTK: one past the largest position of the call is the length); YaRN also scales the rotated part
(`rotary_attention_factor`). Layers with an attention window may rotate with their own frequencies
(`rotary_local_freqs`, Gemma 3).
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxlens.config import Config


def inv_freq(cfg: Config, positions: Int[Array, "batch pos"] | None = None) -> Float[Array, " half"]:
    """Rotation frequencies, with the config's rope scaling (dynamic NTK reads the largest of `positions`)."""
    R = cfg.rotary_dim
    if cfg.rotary_freqs is not None:
        return jnp.asarray(cfg.rotary_freqs, jnp.float32)
    base = jnp.float32(cfg.rotary_base)
    if cfg.rotary_dynamic_ntk is not None and positions is not None:
        factor, max_pos = cfg.rotary_dynamic_ntk
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (R / (R - 2))
    freq = 1.0 / (base ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
    if cfg.rotary_scaling is None:
        return freq
    factor, low, high, old_ctx = cfg.rotary_scaling
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > old_ctx / low, freq / factor, freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rotary(
    x: Float[Array, "batch pos head d_head"],
    positions: Int[Array, "batch pos"],
    cfg: Config,
    local: Bool[Array, ""] | None = None,
) -> Float[Array, "batch pos head d_head"]:
    """Rotate the first rotary_dim dims of every head by angle position * frequency (`local`: whether this
    layer has an attention window, which picks `cfg.rotary_local_freqs` when set)."""
    R = cfg.rotary_dim
    freq = inv_freq(cfg, positions)
    if cfg.rotary_local_freqs is not None and local is not None:
        freq = jnp.where(local, jnp.asarray(cfg.rotary_local_freqs, jnp.float32), freq)
    angles = positions.astype(jnp.float32)[..., None] * freq  # [batch pos half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if cfg.rotary_attention_factor != 1.0:
        cos, sin = cos * cfg.rotary_attention_factor, sin * cfg.rotary_attention_factor
    rot = x[..., :R].astype(jnp.float32)
    if cfg.rotary_adjacent_pairs:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), x[..., R:]], axis=-1)
