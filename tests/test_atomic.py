"""jaxlens._atomic, the one way jaxlens writes files: a destination is either the old file (or folder) or the
complete new one, never partial, and nothing temporary is left behind; results get ordinary permissions."""

import json
import os
import stat

import pytest

from jaxlens import _atomic
from jaxlens.errors import InputError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ordinary(bits: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return bits & ~mask


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_path_renames_a_complete_file(tmp_path, durable):
    final = tmp_path / "sub" / "out.bin"
    with _atomic.atomic_path(final, durable=durable) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not final.exists()  # nothing under the final name until the block is done
    assert final.read_bytes() == b"new"
    assert _mode(final) == _ordinary(0o666)
    assert [p.name for p in final.parent.iterdir()] == ["out.bin"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    final = tmp_path / "out.json"
    final.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with _atomic.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_helpers(tmp_path):
    assert _atomic.write_bytes(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    _atomic.write_text(tmp_path / "b.txt", "héllo", durable=True)
    assert (tmp_path / "b.txt").read_bytes() == "héllo".encode()
    data = {"x": [1, 2.5], "y": None}
    _atomic.write_json(tmp_path / "c.json", data)
    assert json.loads((tmp_path / "c.json").read_text()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from the last run")
    with _atomic.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("this run")
        assert (out / "stale.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _mode(out) == _ordinary(0o777)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with _atomic.atomic_dir(out) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        with _atomic.atomic_dir(tmp_path / "f"):
            pass
