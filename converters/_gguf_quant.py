"""GGUF tensor types decoded to float32 (or straight to float16 / bfloat16): every type the `gguf` package
can decode, in numpy (no PyTorch).

A quantised GGUF tensor is a sequence of fixed-size blocks, each holding `block_size` elements in `type_size`
bytes (scales, minimums and packed integers). `dequantize` decodes a tensor a chunk of blocks at a time, so
the temporaries stay a few MiB, with one of two decoders per type:

- `gguf.quants.dequantize` (the `gguf` package's numpy transcription of ggml's `dequantize_row_*`): every type
  it knows, the K-quants of every bit width, the i-quants, TQ1_0 / TQ2_0, MXFP4, NVFP4 and the rest;
- a hand-written fast path below (`_FAST`), only for types where `benchmarks/bench_dequant.py` measured it
  faster than `gguf.quants` and `tests/converters/test_gguf_quants.py` checks it bit-identical to it.

`dequantize(..., dtype=)` writes each decoded chunk straight into an array of the target dtype (float16 or
bfloat16 for a half-precision model), so no float32 copy of the tensor exists: a tensor already stored in the
target dtype (F16 -> float16, BF16 -> bfloat16, F32 -> float32) is copied as it is, bits unchanged; any other
is decoded to float32 a chunk at a time and rounded to the nearest `dtype` value (what `.astype(dtype)` of
the float32 result gives, exactly).

A ggml type that neither decodes (Q8_1 and Q8_K, ggml's dot-product intermediates; integer tensors; a type
newer than the installed `gguf`) is a CheckpointError naming it and the decodable types.

    dequantize(raw_bytes, "Q4_K", (576, 1536))                       # float32 [576, 1536]
    dequantize(raw_bytes, "BF16", (576, 1536), dtype=jnp.bfloat16)   # the stored bits, as bfloat16
"""

import functools
from collections.abc import Callable

import ml_dtypes
import numpy as np

from jaxlens.errors import CheckpointError, InputError

_CHUNK_ELEMENTS = 1 << 20  # elements decoded per step: bounds the decoders' temporaries to a few MiB


def block_layout(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of ggml type `type_name`, from `gguf.GGML_QUANT_SIZES`.

    Raises:
        CheckpointError: a name the installed gguf package does not know.
    """
    import gguf

    try:
        return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]])
    except KeyError:
        raise CheckpointError(f"Unknown ggml type {type_name!r}; gguf {_gguf_version()} knows "
                              f"{', '.join(t.name for t in gguf.GGMLQuantizationType)}.") from None


@functools.cache
def supported_types() -> tuple[str, ...]:
    """Every ggml type jaxlens can decode: the fast paths, and each type `gguf.quants.dequantize` decodes."""
    import gguf

    return tuple(t.name for t in gguf.GGMLQuantizationType if t.name in _FAST or _gguf_decodes(t))


def can_dequantize(type_name: str) -> bool:
    """Whether `dequantize` decodes ggml type `type_name`."""
    return type_name in supported_types()


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], dtype=np.float32, *,
               reuse_raw: bool = False) -> np.ndarray:
    """Decode one tensor's raw GGUF bytes to `dtype`, without a float32 copy when `dtype` is narrower.

    Args:
        raw: the tensor's bytes as uint8 (any shape; read in C order).
        type_name: its ggml type, one of `supported_types()`.
        shape: its shape in numpy order; the last axis is the GGUF row, a whole number of blocks long.
        dtype: float32, float16 or bfloat16 (`float_dtype`): the float32 decoding rounded to it, or the
            stored values themselves when the tensor is stored in that dtype.
        reuse_raw: `raw` is a buffer of the caller's own that may become the result: a tensor stored in
            `dtype` is then returned as a view of it, without a copy.

    Returns:
        A new array of `shape` and `dtype` (with `reuse_raw`, possibly a view of `raw`).

    Raises:
        CheckpointError: a type nothing here decodes, or a byte count or row length that does not fit the
            type's blocks.
        InputError: `dtype` is not one of float32, float16, bfloat16.
    """
    dtype = float_dtype(dtype)
    if not can_dequantize(type_name):
        raise CheckpointError(
            f"Cannot dequantise ggml type {type_name}: neither jaxlens nor gguf {_gguf_version()}'s "
            f"gguf.quants has a decoder for it. Decodable types: {', '.join(supported_types())}. Re-quantise "
            "the model to one of them (llama.cpp's `llama-quantize`), or upgrade the gguf package."
        )
    block_size, type_size = block_layout(type_name)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if (shape and shape[-1] % block_size) or raw.size != n // block_size * type_size:
        raise CheckpointError(
            f"A {type_name} tensor of shape {shape} needs rows that are a multiple of {block_size} elements "
            f"and {n // block_size * type_size} bytes; got {raw.size} bytes. The file is corrupt."
        )
    if _STORED.get(type_name) == dtype.name:  # stored in the target dtype: the bits as they are
        out = raw.view(dtype).reshape(shape)
        return out if reuse_raw else out.copy()
    blocks = raw.reshape(-1, type_size)
    decode = _FAST.get(type_name) or _gguf_decoder(type_name)
    out = np.empty((len(blocks), block_size), dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size)
    for start in range(0, len(blocks), step):
        out[start: start + step] = decode(blocks[start: start + step])  # float32 chunk, rounded to dtype
    return out.reshape(shape)


def float_dtype(dtype) -> np.dtype:
    """`dtype` (np.float32, jnp.bfloat16, "float16", ...) as the numpy dtype that checkpoints load to.

    Raises:
        InputError: anything but float32, float16 or bfloat16.
    """
    try:
        found = np.dtype(ml_dtypes.bfloat16 if isinstance(dtype, str) and dtype == "bfloat16" else dtype)
    except TypeError:
        found = None
    if found is None or found.name not in _FLOAT_DTYPES:
        raise InputError(f"jaxlens loads params as float32, float16 or bfloat16; got dtype={dtype!r}. Pass "
                         "e.g. dtype=jnp.bfloat16 (or np.float16, np.float32).")
    return found


# ggml types whose stored values are a numpy dtype already: decoded by a copy, not a conversion
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _gguf_decoder(type_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """blocks [n, type_size] uint8 -> [n, block_size] float32 through `gguf.quants.dequantize`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    return lambda b: gguf.quants.dequantize(np.ascontiguousarray(b), qtype)


def _gguf_decodes(qtype) -> bool:
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(not installed)"


# --- decoders: blocks [n, type_size] uint8 -> [n, block_size] float32, after ggml-quants.c ------------------


def _fp16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 (little-endian IEEE half) -> [n, 1] float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., k] packed bytes -> [..., 2, k]: low nibbles, then high nibbles (ggml's order within a block)."""
    return np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2)


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


def _q5_bits(b: np.ndarray, qh_at: int) -> np.ndarray:
    """Q5_0 / Q5_1 quants 0..31 [n, 32]: nibbles as Q4_0, bit j of the u32 `qh` the fifth bit of element j."""
    low = _nibbles(b[:, qh_at + 4: qh_at + 20]).reshape(len(b), 32)
    high = np.unpackbits(b[:, qh_at: qh_at + 4], axis=1, bitorder="little")
    return low | (high << np.uint8(4))


def _q5_0(b: np.ndarray) -> np.ndarray:
    # block_q5_0 {fp16 d; uint8 qh[4]; uint8 qs[16]}: y = d * (q - 16)
    return (_q5_bits(b, 2).astype(np.int8) - np.int8(16)).astype(np.float32) * _fp16(b[:, 0:2])


def _q5_1(b: np.ndarray) -> np.ndarray:
    # block_q5_1 {fp16 d, m; uint8 qh[4]; uint8 qs[16]}: y = d * q + m
    return _fp16(b[:, 0:2]) * _q5_bits(b, 4).astype(np.float32) + _fp16(b[:, 2:4])


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


#: Every hand-written decoder, measured against gguf.quants by benchmarks/bench_dequant.py (F32 and F16 have
#: none: gguf.quants' view and cast are as fast as numpy gets).
HAND_WRITTEN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
#: The hand-written decoders `dequantize` uses: those the benchmark found faster than gguf.quants.
_FAST: dict[str, Callable[[np.ndarray], np.ndarray]] = dict(HAND_WRITTEN)

