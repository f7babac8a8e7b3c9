"""Rotary position embeddings (Su et al. 2021, "RoFormer").

Two layouts, chosen by `cfg.rotary_adjacent_pairs`: rotate halves (GPT-NeoX, Llama: dims i and i + R/2 form a
pair) or adjacent pairs (GPT-J: dims 2i and 2i+1). Only the first `cfg.rotary_dim` dims of each head rotate.
"""

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxlens.config import Config


def inv_freq(cfg: Config) -> Float[Array, " half"]:
    """Rotation frequencies, with Llama-3 scaling when `cfg.rotary_scaling` is set."""
    R = cfg.rotary_dim
    freq = 1.0 / (cfg.rotary_base ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
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
) -> Float[Array, "batch pos head d_head"]:
    """Rotate the first rotary_dim dims of every head by angle position * frequency."""
    R = cfg.rotary_dim
    angles = positions.astype(jnp.float32)[..., None] * inv_freq(cfg)  # [batch pos half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    rot = x[..., :R].astype(jnp.float32)
    if cfg.rotary_adjacent_pairs:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), x[..., R:]], axis=-1)
