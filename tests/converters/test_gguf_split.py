"""Split GGUF models (jaxlens.converters._gguf_split): the parts llama.cpp's `gguf-split` writes.

The reference writer is the gguf package's own (`GGUFWriter(split_max_tensors=...)`, what llama.cpp's
convert_hf_to_gguf.py uses for `--split-max-tensors`): parts `NAME-0000k-of-0000N.gguf`, all of the model's
metadata in the first, `split.no` / `split.count` / `split.tensors.count` in each. A random tiny Llama is
written whole and in 3 parts; loaded from any part, its params equal the whole file's and its logits the
PyTorch model's within 1e-4. Broken sets (written part by part here, as gguf-split lays them out) are
refused with errors naming what is wrong.
"""

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_writing import write_out
from test_smollm2 import _LLAMA, _logits, write_like_llama_cpp

from jaxlens import converters, hub, testing
from jaxlens.converters import _gguf
from jaxlens.converters._gguf_split import read_gguf
from jaxlens.errors import CheckpointError

T = 9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(whole file, first part of 3, HF model, tokens, HF logits)."""
    hf = testing.random_hf_model("LlamaConfig", "LlamaForCausalLM", seed=14,
                                 **dict(_LLAMA, num_key_value_heads=2, initializer_range=0.1))
    whole = write_like_llama_cpp(hf, "llama", tmp_path_factory.mktemp("whole") / "tiny.gguf")
    first = write_like_llama_cpp(hf, "llama", tmp_path_factory.mktemp("split") / "tiny.gguf",
                                 split_max_tensors=12)  # 3 layers x 9 + 3 = 30 tensors: 12 + 12 + 6
    tokens = np.random.RandomState(14).randint(0, _LLAMA["vocab_size"], (2, T))
    return whole, first, hf, tokens, testing.hf_outputs(hf, tokens)["logits"]


def _parts(first: Path) -> list[Path]:
    return sorted(first.parent.glob("tiny-*-of-00003.gguf"))


def test_writer_makes_llama_cpp_parts(model):
    """Guards the tests below: three parts, llama.cpp's names, the model's metadata in the first only."""
    _, first, *_ = model
    parts = _parts(first)
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)] and first == parts[0]
    readers = [gguf.GGUFReader(p) for p in parts]
    assert [len(r.tensors) for r in readers] == [12, 12, 6]
    assert "llama.block_count" in readers[0].fields and "llama.block_count" not in readers[1].fields
    assert [r.fields["split.no"].contents() for r in readers] == [0, 1, 2]


@pytest.mark.parametrize("part", [0, 1, 2])
def test_split_loads_from_any_part_like_the_whole_file(model, part, tmp_path):
    whole, first, _, tokens, want = model
    cfg, params = _gguf.load(_parts(first)[part], cache_dir=tmp_path, progress=False)
    cfg_whole, params_whole = _gguf.load(whole, cache_dir=tmp_path, progress=False)
    assert cfg == cfg_whole
    flat, flat_whole = converters.flatten_params(params), converters.flatten_params(params_whole)
    assert flat.keys() == flat_whole.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(value, flat_whole[name], err_msg=name)
    np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


def test_split_metadata_and_parts(model, tmp_path, monkeypatch):
    whole, first, *_ = model
    gf, gf_whole = read_gguf(_parts(first)[1]), read_gguf(whole)
    assert gf.parts == _parts(first) and gf.path == first
    assert gf.metadata == gf_whole.metadata  # the split.* keys are the parts' business only
    assert sorted(gf.names()) == sorted(gf_whole.names())
    monkeypatch.setenv("JAXLENS_CACHE", str(tmp_path))
    assert converters.load(_parts(first)[2])[0] == converters.load(whole)[0]


def test_split_is_one_cache_entry_keyed_by_every_part(model, tmp_path):
    _, first, *_ = model
    _gguf.load(first, cache_dir=tmp_path, progress=False)
    records = list(tmp_path.glob("gguf-*.json"))
    assert len(records) == 1
    digests = "\n".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in _parts(first))
    assert json.loads(records[0].read_text())["source_sha256"] == hashlib.sha256(digests.encode()).hexdigest()


# --- broken sets --------------------------------------------------------------------------------------------


def _copy(first: Path, to: Path) -> list[Path]:
    to.mkdir(parents=True)
    return [Path(shutil.copy(p, to / p.name)) for p in _parts(first)]


def _write_part(path: Path, no: int, count: int, total: int, tensors: dict[str, np.ndarray]) -> Path:
    """One part as gguf-split writes it: the split keys (the model's metadata only in part 0) and tensors."""
    w = gguf.GGUFWriter(path, "llama")
    if no > 0:
        w.kv_data[0].clear()  # the writer adds general.architecture; later parts hold only the split keys
    w.add_uint16("split.no", no)
    w.add_uint16("split.count", count)
    w.add_int32("split.tensors.count", total)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    write_out(w)
    return path


def test_missing_part_is_named(model, tmp_path):
    _, first, *_ = model
    parts = _copy(first, tmp_path / "m")
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=r"split into 3 files.*1 part\(s\) are missing.*"
                                              r"\['tiny-00002-of-00003\.gguf'\]"):
        read_gguf(parts[2])


def test_part_of_another_split_is_refused(model, tmp_path):
    """A part whose split.count disagrees with the set (here: part 2 of a 2-part split put in as part 3)."""
    _, first, hf, *_ = model
    (tmp_path / "two").mkdir()
    other = write_like_llama_cpp(hf, "llama", tmp_path / "two" / "tiny.gguf", split_max_tensors=20)
    parts = _copy(first, tmp_path / "m")
    shutil.copy(other.with_name("tiny-00002-of-00002.gguf"), parts[2])
    with pytest.raises(CheckpointError, match=r"should be part 3 of 3 \(split\.no=2, split\.count=3\), but "
                                              r"its metadata says split\.no=1, split\.count=2"):
        read_gguf(parts[0])


def test_duplicated_tensor_is_refused(tmp_path):
    a, b = np.zeros((2, 32), np.float32), np.ones((2, 32), np.float32)
    _write_part(tmp_path / "d-00001-of-00002.gguf", 0, 2, 3, {"x": a, "y": a})
    _write_part(tmp_path / "d-00002-of-00002.gguf", 1, 2, 3, {"y": b})
    with pytest.raises(CheckpointError, match=r"Tensor 'y' is in two parts of the split model, "
                                              r"d-00001-of-00002\.gguf and d-00002-of-00002\.gguf"):
        read_gguf(tmp_path / "d-00001-of-00002.gguf")


def test_tensor_total_must_match_split_tensors_count(tmp_path):
    a = np.zeros((2, 32), np.float32)
    _write_part(tmp_path / "c-00001-of-00002.gguf", 0, 2, 4, {"x": a})
    _write_part(tmp_path / "c-00002-of-00002.gguf", 1, 2, 4, {"y": a, "z": a})
    with pytest.raises(CheckpointError, match=r"should hold 4 tensors \(split\.tensors\.count\), but its "
                                              r"parts hold 3"):
        read_gguf(tmp_path / "c-00002-of-00002.gguf")
    gf = read_gguf(_write_part(tmp_path / "c-00001-of-00002.gguf", 0, 2, 3, {"x": a}))  # consistent now
    assert gf.names() == ["x", "y", "z"]


def test_renamed_part_cannot_find_the_others(model, tmp_path):
    _, first, *_ = model
    parts = _copy(first, tmp_path / "m")
    renamed = parts[0].rename(parts[0].with_name("tiny.gguf"))
    with pytest.raises(CheckpointError, match=r"part 1 of a GGUF model split into 3 files.*"
                                              r"'NAME-00001-of-00003\.gguf'.*llama-gguf-split --merge"):
        read_gguf(renamed)


def test_split_model_in_the_hf_cache_resolves_to_its_first_part(model, tmp_path, monkeypatch):
    """A Hugging Face cache snapshot holding the parts of one split model (and nothing else) is that model;
    parts of two different files together stay ambiguous."""
    _, first, *_ = model
    snap = tmp_path / "hub" / "models--org--tiny-split" / "snapshots" / "abc"
    _copy(first, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.resolve("org/tiny-split") == snap / "tiny-00001-of-00003.gguf"
    shutil.copy(snap / "tiny-00003-of-00003.gguf", snap / "other-00001-of-00001.gguf")
    with pytest.raises(CheckpointError, match=r"holds several GGUF files"):
        hub.resolve("org/tiny-split")
