"""Half-precision GGUF loading (`dtype=jnp.bfloat16` / `np.float16`) without a float32 copy of the model.

References: the gguf package's decoder (`gguf.quants.dequantize`, float32) cast by numpy's `astype` for every
decoded tensor; the file's own bytes (read by `gguf.GGUFReader`) for a tensor stored in the target dtype;
jaxlens's float32 load (checked against PyTorch elsewhere) cast to the dtype for whole models, bit for bit;
the PyTorch model for the logits. Memory: tracemalloc (numpy reports its buffers to it) sees the peak of
decoding a 12M-element file stay near its bfloat16 size, where the float32 decode needs the float32 size.
"""

import tracemalloc

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf_writing import write_out
from test_smollm2 import write_like_llama_cpp

from jaxlens import HookedTransformer, converters, testing
from jaxlens.converters import _gguf, _gguf_quant
from jaxlens.converters._gguf_quant import dequantize
from jaxlens.converters._gguf_split import dequantize_all, read_gguf
from jaxlens.errors import InputError

QT = gguf.GGMLQuantizationType
BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
T = 8
_CONF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, initializer_range=0.1)
# storage of each kind of matrix: every decoding path (stored as is, decoded and rounded)
_STORAGE = {"attn_q": QT.F16, "attn_k": QT.BF16, "attn_v": QT.Q8_0, "attn_output": QT.Q4_1,
            "ffn_gate": QT.Q5_0, "ffn_up": QT.BF16, "ffn_down": QT.F16}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(GGUF path with F16, BF16 and quantised matrices, F32 vectors; HF model; tokens; HF logits)."""
    hf = testing.random_hf_model("LlamaConfig", "LlamaForCausalLM", seed=16, **_CONF)
    quantise = {f"blk.{i}.{kind}.weight": q for i in range(2) for kind, q in _STORAGE.items()}
    quantise |= {"token_embd.weight": QT.Q8_0, "output.weight": QT.BF16}
    path = write_like_llama_cpp(hf, "llama", tmp_path_factory.mktemp("half") / "half.gguf", quantise=quantise)
    tokens = np.random.RandomState(16).randint(0, _CONF["vocab_size"], (2, T))
    return path, hf, tokens, testing.hf_outputs(hf, tokens)["logits"]


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_half_load_is_the_float32_load_cast(model, dtype, tmp_path):
    path, *_ = model
    cfg, params = _gguf.load(path, dtype=dtype, progress=False, cache_dir=tmp_path)
    cfg32, params32 = _gguf.load(path, progress=False, cache_dir=tmp_path)
    assert cfg == cfg32
    flat, flat32 = converters.flatten_params(params), converters.flatten_params(params32)
    assert flat.keys() == flat32.keys()
    for name, value in flat.items():
        assert value.dtype == dtype, name
        np.testing.assert_array_equal(_bits(value), _bits(flat32[name].astype(dtype)), err_msg=name)


def test_unprocessed_half_model_is_the_float32_model_cast(model, tmp_path, monkeypatch):
    """from_pretrained_no_processing(dtype=bfloat16) reads the file straight to bfloat16: the params equal
    the float32 model's cast, bit for bit, and the logits are the float32 model's within bfloat16's
    precision. The float32 model (its loader checked against PyTorch in test_smollm2) matches PyTorch here
    within the quantisation error."""
    path, _, tokens, hf_logits = model
    monkeypatch.setenv("JAXLENS_CACHE", str(tmp_path))
    m32 = HookedTransformer.from_pretrained_no_processing(path)
    m16 = HookedTransformer.from_pretrained_no_processing(path, dtype=jnp.bfloat16)
    p32, p16 = converters.flatten_params(m32.params), converters.flatten_params(m16.params)
    for name, value in p16.items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(_bits(np.asarray(value)), _bits(np.asarray(p32[name]).astype(BF16)))
    want = np.asarray(m32(tokens))
    assert np.abs(want - hf_logits).max() < 0.3 * np.abs(hf_logits).max()  # 4-bit matrices: coarse
    got = np.asarray(m16(tokens), np.float32)
    assert np.abs(got - want).max() < 3e-2 * np.abs(want).max()  # bfloat16: 8 significant bits


def test_stored_dtype_keeps_the_file_bits(model):
    path, *_ = model
    gf, reader = read_gguf(path), gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    for name, dtype in (("blk.0.attn_q.weight", F16), ("blk.0.attn_k.weight", BF16)):
        got = gf.get(name, dtype)
        assert got.dtype == dtype and got.shape == gf.shape(name)
        assert got.tobytes() == np.asarray(stored[name].data).tobytes(), name


def test_vectors_stay_float32(model):
    path, *_ = model
    _, tensors = dequantize_all(path, dtype=BF16, progress=False)
    assert tensors["blk.0.attn_norm.weight"].dtype == np.float32
    assert tensors["blk.0.attn_q.weight"].dtype == tensors["token_embd.weight"].dtype == BF16


def _random_blocks(qtype, n_blocks: int, scale_at: tuple[int, ...], seed: int) -> np.ndarray:
    """Random raw blocks with finite fp16 scales at the byte offsets `scale_at`."""
    rng = np.random.RandomState(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.randint(0, 256, (n_blocks, type_size)).astype(np.uint8)
    for at in scale_at:
        b[:, at: at + 2] = rng.uniform(1e-3, 1e-1, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return b


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                                   QT.Q4_K, QT.Q6_K, QT.IQ4_NL])
def test_dequantize_to_dtype_is_gguf_decoding_cast(qtype, dtype):
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (6, 2 * block_size if block_size > 1 else 40)
    if qtype in (QT.Q4_K, QT.Q6_K, QT.IQ4_NL):  # no quantiser in the gguf package: random blocks
        at = {QT.Q4_K: (0, 2), QT.Q6_K: (208,), QT.IQ4_NL: (0,)}[qtype]
        raw = _random_blocks(qtype, shape[0] * shape[1] // block_size, at, seed=int(qtype))
    else:
        x = np.random.RandomState(3).standard_normal(shape).astype(np.float32)
        x[0, 0] = 70000.0  # beyond float16's range: float16 gets inf, as astype gives it
        with np.errstate(over="ignore"):
            raw = gguf.quants.quantize(x, qtype)
    with np.errstate(over="ignore"):  # numpy warns of the infinities
        want = gguf.quants.dequantize(raw, qtype).reshape(shape).astype(dtype)
        got = dequantize(np.asarray(raw).view(np.uint8), qtype.name, shape, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_other_dtypes_are_refused(model, tmp_path):
    path, *_ = model
    raw = gguf.quants.quantize(np.zeros((1, 32), np.float32), QT.Q8_0)
    for bad in (np.int8, "float64", jnp.float64, "half-ish"):
        with pytest.raises(InputError, match=r"float32, float16 or bfloat16; got dtype=.*jnp\.bfloat16"):
            dequantize(raw, "Q8_0", (1, 32), bad)
    with pytest.raises(InputError, match=r"got dtype=<class 'numpy\.int32'>"):
        _gguf.load(path, dtype=np.int32, progress=False, cache_dir=tmp_path)
    with pytest.raises(InputError, match=r"got dtype='float64'"):
        converters.load(path, dtype="float64")


# --- memory -------------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_half_decode_peak_stays_below_the_float32_size(tmp_path, monkeypatch):
    """12M elements (48 MiB as float32, 24 MiB as bfloat16) in six matrices stored as Q8_0, BF16 and F16:
    decoding to bfloat16 peaks below the result plus the largest tensor's raw bytes plus 2 MiB (the
    decoder's chunk temporaries, 64k elements here), under 0.65x the float32 size; decoding to float32 (the
    guard: tracemalloc sees numpy's buffers) peaks at no less than the float32 size."""
    monkeypatch.setattr(_gguf_quant, "_CHUNK_ELEMENTS", 1 << 16)
    shape, types = (512, 4096), (QT.Q8_0, QT.BF16, QT.F16) * 2
    x = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
    w = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    for i, qtype in enumerate(types):
        w.add_tensor(f"w{i}", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    write_out(w)
    del x
    n = len(types) * shape[0] * shape[1]
    fp32_bytes, half_bytes = 4 * n, 2 * n
    largest_raw = max(gguf.quants.quant_shape_to_byte_shape(shape, q)[-1] * shape[0] for q in types)
    half = _peak_bytes(lambda: dequantize_all(tmp_path / "big.gguf", dtype=BF16, progress=False))
    full = _peak_bytes(lambda: dequantize_all(tmp_path / "big.gguf", progress=False))
    assert full >= fp32_bytes
    assert half < half_bytes + largest_raw + (2 << 20), (half / fp32_bytes, full / fp32_bytes)
    assert half < 0.65 * fp32_bytes

