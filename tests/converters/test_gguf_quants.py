"""Every ggml tensor type the `gguf` package knows: decoded by jaxlens exactly as `gguf.quants.dequantize`
decodes it, read back from a real GGUF file; a clear error for each type nothing can decode.

The data of each type is quantised by `gguf.quants.quantize` from random normals where gguf can quantise the
type, and otherwise random blocks whose fp16 scale fields hold finite halves (their offsets read from ggml's
block structs). The hand-written fast paths of `_gguf_quant` are compared bit for bit (as uint32) with
gguf.quants on many blocks.
"""

import gguf
import numpy as np
import pytest
from gguf_writing import write_out

from jaxlens.converters import _gguf_quant
from jaxlens.converters._gguf_quant import can_dequantize, dequantize, supported_types
from jaxlens.converters._gguf_split import read_gguf
from jaxlens.errors import CheckpointError

QT = gguf.GGMLQuantizationType
ALL_TYPES = [t.name for t in QT]

# Byte offsets of each block's fp16 scale fields (ggml-common.h's block_* structs).
HALVES = {
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "TQ1_0": (52,),
    "TQ2_0": (64,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ1_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,),
}


def _gguf_decodes(type_name: str) -> bool:
    _, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), QT[type_name])
    except NotImplementedError:
        return False
    return True


DECODABLE = [t for t in ALL_TYPES if _gguf_decodes(t)]
UNDECODABLE = [t for t in ALL_TYPES if t not in DECODABLE]


def blocks_of(type_name: str, n_blocks: int, seed: int) -> tuple[np.ndarray, bool]:
    """[n_blocks, type_size] uint8 in `type_name`, and whether gguf's own quantiser made them."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    x = rng.normal(size=(n_blocks, block_size)).astype(np.float32)
    if type_name == "F32":
        return x.view(np.uint8), True
    try:
        return np.asarray(gguf.quants.quantize(x, QT[type_name])).view(np.uint8).reshape(n_blocks, -1), True
    except (NotImplementedError, gguf.quants.QuantError):
        pass
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in HALVES.get(type_name, ()):
        raw[:, at: at + 2] = rng.normal(scale=0.05, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw, False


def reference(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, QT[type_name]), np.float32).reshape(shape)


def write_raw(path, name: str, raw: np.ndarray, type_name: str, shape) -> None:
    w = gguf.GGUFWriter(path, arch="llama")
    if type_name == "F32":
        w.add_tensor(name, raw.view(np.float32).reshape(shape))
    elif type_name == "F16":
        w.add_tensor(name, raw.view(np.float16).reshape(shape))
    else:
        w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=QT[type_name])
    write_out(w)


def test_every_type_is_either_decodable_or_named_undecodable():
    assert set(supported_types()) == set(DECODABLE)  # jaxlens decodes exactly what gguf.quants decodes
    assert {"Q5_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_XS", "TQ2_0", "MXFP4"} <= set(supported_types())


@pytest.mark.parametrize("type_name", DECODABLE)
def test_gguf_file_of_each_type_decodes_as_gguf_quants(tmp_path, monkeypatch, type_name):
    monkeypatch.setattr(_gguf_quant, "_CHUNK_ELEMENTS", 512)  # several decode steps on a small tensor
    block_size, _ = gguf.GGML_QUANT_SIZES[QT[type_name]]
    per_row = max(1, 512 // block_size)
    raw, quantised = blocks_of(type_name, 3 * per_row, seed=len(type_name))
    shape = (3, per_row * block_size)
    path = tmp_path / f"{type_name}.gguf"
    write_raw(path, "blk.0.w", raw, type_name, shape)
    gf = read_gguf(path)
    assert gf.ggml_type("blk.0.w") == type_name and gf.shape("blk.0.w") == shape
    ours = gf.get("blk.0.w")
    expected = reference(raw, type_name, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, expected)
    assert np.isfinite(expected).mean() > 0.9 and np.unique(expected).size > 3
    if quantised and type_name not in ("F32", "F16", "BF16"):  # a quantisation of the normals, not noise
        x = np.random.default_rng(len(type_name)).normal(size=shape).astype(np.float32)
        assert np.corrcoef(ours.ravel(), x.ravel())[0, 1] > 0.5


@pytest.mark.parametrize("type_name", sorted(_gguf_quant.HAND_WRITTEN))
def test_hand_written_fast_paths_are_bit_identical_to_gguf_quants(type_name):
    raw, _ = blocks_of(type_name, 4000, seed=7)
    block_size, _ = gguf.GGML_QUANT_SIZES[QT[type_name]]
    ours = _gguf_quant.HAND_WRITTEN[type_name](raw).reshape(-1)
    theirs = reference(raw, type_name, (-1,))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    via_dequantize = dequantize(raw, type_name, (40, 4000 * block_size // 40))
    np.testing.assert_array_equal(via_dequantize.reshape(-1).view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("type_name", UNDECODABLE)
def test_undecodable_type_is_a_clear_error(type_name):
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[type_name]]
    assert not can_dequantize(type_name)
    with pytest.raises(CheckpointError) as e:
        dequantize(np.zeros(type_size, np.uint8), type_name, (block_size,))
    msg = str(e.value)
    assert f"ggml type {type_name}" in msg and "Q4_K" in msg and "llama-quantize" in msg


def test_unknown_type_name_lists_the_known_ones():
    with pytest.raises(CheckpointError, match="Unknown ggml type 'Q9_X'.*Q4_K"):
        _gguf_quant.block_layout("Q9_X")
