"""GGUF tensor types decoded to float32: ggml's block quantisations, vectorised in numpy (no PyTorch).

A quantised GGUF tensor is a sequence of fixed-size blocks, each holding `block_size` elements in `type_size`
bytes (scales, minimums and packed integers). Each decoder below is a transcription of `dequantize_row_*` in
ggml's `ggml-quants.c`, on a whole array of blocks at once; `dequantize` decodes a tensor a chunk of blocks at
a time so the temporaries stay a few MiB.

    dequantize(raw_bytes, "Q4_K", (576, 1536))     # float32 [576, 1536]
"""

from collections.abc import Callable

import numpy as np

from jaxlens.errors import CheckpointError

#: Tensor types jaxlens can dequantise: name -> (elements per block, bytes per block), as ggml's type traits.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(BLOCK_LAYOUT)

_CHUNK_ELEMENTS = 1 << 20  # elements decoded per step: bounds the decoders' temporaries to a few MiB


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one tensor's raw GGUF bytes to float32.

    Args:
        raw: the tensor's bytes as uint8 (any shape; read in C order).
        type_name: its ggml type, one of `SUPPORTED_TYPES`.
        shape: its shape in numpy order; the last axis is the GGUF row, a whole number of blocks long.

    Returns:
        A new float32 array of `shape`.

    Raises:
        CheckpointError: unsupported type, or a byte count or row length that does not fit the type's blocks.
    """
    if type_name not in BLOCK_LAYOUT:
        raise CheckpointError(
            f"Cannot dequantise ggml type {type_name}. Supported types: {', '.join(SUPPORTED_TYPES)}."
        )
    block_size, type_size = BLOCK_LAYOUT[type_name]
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if (shape and shape[-1] % block_size) or raw.size != n // block_size * type_size:
        raise CheckpointError(
            f"A {type_name} tensor of shape {shape} needs rows that are a multiple of {block_size} elements "
            f"and {n // block_size * type_size} bytes; got {raw.size} bytes. The file is corrupt."
        )
    blocks = raw.reshape(-1, type_size)
    decode = _DECODERS[type_name]
    out = np.empty((len(blocks), block_size), np.float32)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, len(blocks), step):
        out[start: start + step] = decode(blocks[start: start + step])
    return out.reshape(shape)


# --- decoders: blocks [n, type_size] uint8 -> [n, block_size] float32, after ggml-quants.c ------------------


def _fp16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 (little-endian IEEE half) -> [n, 1] float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., k] packed bytes -> [..., 2, k]: low nibbles, then high nibbles (ggml's order within a block)."""
    return np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2)


def _f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _q8_0(b: np.ndarray) -> np.ndarray:
    # block_q8_0 {fp16 d; int8 qs[32]}: y = d * q
    return b[:, 2:].view(np.int8).astype(np.float32) * _fp16(b[:, 0:2])


def _q4_0(b: np.ndarray) -> np.ndarray:
    # block_q4_0 {fp16 d; uint8 qs[16]}: y[j] = d * (lo(qs[j]) - 8), y[j + 16] = d * (hi(qs[j]) - 8)
    q = _nibbles(b[:, 2:]).reshape(len(b), 32).astype(np.float32) - np.float32(8)
    return q * _fp16(b[:, 0:2])


def _q4_1(b: np.ndarray) -> np.ndarray:
    # block_q4_1 {fp16 d, m; uint8 qs[16]}: y = d * q + m, same nibble order as q4_0
    q = _nibbles(b[:, 4:]).reshape(len(b), 32).astype(np.float32)
    return q * _fp16(b[:, 0:2]) + _fp16(b[:, 2:4])


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes: `get_scale_min_k4` for j = 0..7, vectorised."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    u4, u6, u15, u63 = np.uint8(4), np.uint8(6), np.uint8(0x0F), np.uint8(63)
    scales = np.concatenate([lo & u63, (hi & u15) | ((lo >> u6) << u4)], axis=1)
    mins = np.concatenate([mid & u63, (hi >> u4) | ((mid >> u6) << u4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    # block_q4_K {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}: 8 sub-blocks of 32, y = d*sc*q - dmin*m;
    # 32 bytes of qs serve two sub-blocks (low nibbles, then high nibbles).
    n = len(b)
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    d = (_fp16(b[:, 0:2]) * scales)[:, :, None]
    m = (_fp16(b[:, 2:4]) * mins)[:, :, None]
    return (d * q - m).reshape(n, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    # block_q5_K {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}: as q4_K, with bit k of
    # qh[l] the fifth bit of element l of sub-block k.
    n = len(b)
    scales, mins = _k_scales_mins(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = (low | (high << np.uint8(4))).astype(np.float32)
    d = (_fp16(b[:, 0:2]) * scales)[:, :, None]
    m = (_fp16(b[:, 2:4]) * mins)[:, :, None]
    return (d * q - m).reshape(n, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}: two halves of 128; in each, groups
    # g = 0..3 of 32 take the low (g < 2) or high nibbles of ql[32*(g % 2) + l] and bits 2g..2g+1 of qh[l];
    # y = d * scales[16-element unit] * (q - 32).
    n = len(b)
    low = _nibbles(b[:, 0:128].reshape(n, 2, 2, 32))  # [half, part, nibble, l]
    low = low.swapaxes(2, 3).reshape(n, 2, 4, 32)  # [half, g = nibble * 2 + part, l]
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    d = (_fp16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (d * q).reshape(n, 256)


_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}

