"""Corrupt safetensors files get a clear CheckpointError: what is wrong, what was found, how to fix it.

(tests/test_errors.py covers a file cut inside the tensor data, a tensor of the wrong shape, leftover tensors
and an unknown config key through `from_pretrained`; these are the header-level corruptions.)
"""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlens import converters
from jaxlens.converters._checkpoint import TensorSource, read_safetensors
from jaxlens.errors import CheckpointError

AGAIN = r"Download or save the checkpoint again"


@pytest.fixture
def good(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}, str(f))
    return f


def _with_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_good_file_reads_back(good):
    r = read_safetensors(good)
    np.testing.assert_array_equal(r["a"](), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert r["b"]().dtype == np.float16 and TensorSource(r).take("b").dtype == np.float32


def test_file_shorter_than_the_length_prefix(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError,
                       match=rf"not a safetensors file: it has 3 bytes, fewer than .*{AGAIN}"):
        read_safetensors(f)


def test_file_cut_inside_the_header(good):
    good.write_bytes(good.read_bytes()[:30])
    with pytest.raises(CheckpointError,
                       match=rf"announce a \d+-byte safetensors header.*30-byte file.*{AGAIN}"):
        read_safetensors(good)


def test_header_that_is_not_json(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 6) + b"{oops!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors header, not valid JSON .*{AGAIN}"):
        read_safetensors(f)


def test_header_entry_without_offsets(tmp_path):
    f = tmp_path / "model.safetensors"
    _with_header(f, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"entry for tensor 'w'.*needs dtype, shape and data_offsets"):
        read_safetensors(f)


def test_offsets_that_disagree_with_the_shape(tmp_path):
    f = tmp_path / "model.safetensors"
    _with_header(f, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24)
    with pytest.raises(CheckpointError, match=r"tensor 'w' \(F32, shape \[2, 3\]\) needs 24 bytes, its "
                                              r"data_offsets \[0, 20\] give 20"):
        read_safetensors(f)


def test_unknown_dtype_names_the_readable_ones(tmp_path):
    f = tmp_path / "model.safetensors"
    _with_header(f, {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError,
                       match=r"'w' has dtype F8_E4M3, which jaxlens cannot read \(it reads F64, "):
        read_safetensors(f)


def test_truncated_data_names_tensor_and_sizes(good):
    size = good.stat().st_size
    good.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=rf"is truncated: tensor '\w' needs bytes up to {size}, the "
                                              rf"file has {size - 4}\. {AGAIN}"):
        read_safetensors(good)


def test_corrupt_file_in_a_model_directory_names_the_file(good):
    (good.parent / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 4}))
    good.write_bytes(good.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its first 8 bytes announce"):
        converters.load(good.parent)
