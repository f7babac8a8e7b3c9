"""A newer CPython for reference environments whose libraries need it (the gemma library needs Python >= 3.12;
the project runs on 3.11): built once from Debian's copy of the upstream source tarball into the reference-env
cache (`tests/ref_envs.py`), reused while present, rebuilt when absent.

The build is minimal (no PGO/LTO, no test modules, no bytecode precompilation) and goes into a temporary
directory renamed into place only when `make install` succeeded, under the same kind of lock file as
`ensure_env`, so an interrupted build is never reused and two test workers never build it twice. Building
needs a C compiler and the -dev packages of scripts/setup.sh (libssl, zlib, libffi, libbz2, liblzma,
libsqlite3)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from ref_envs import build_once, cache_root

# version -> (url of the upstream tarball on the Debian mirror, its sha256)
SOURCES = {
    "3.13": (
        "http://deb.debian.org/debian/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz",
        "93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640",
    ),
}
CONFIGURE = ("--without-ensurepip", "--disable-test-modules")


def _download(url: str, sha256: str, dest: Path) -> None:
    """Downloads `url` to `dest`, raising if its sha256 is not `sha256` (the file is then removed)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as resp, open(dest, "wb") as f:
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != sha256:
        dest.unlink()
        raise RuntimeError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}: the mirror's file "
                           f"changed; update tests/ref_python.py SOURCES after checking the new tarball.")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building Python failed at `{what}` (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def ensure_python(version: str) -> Path:
    """The executable of CPython `version` ("3.13"), built from source into the cache if needed (minutes).

    Returns the path of `bin/python<version>` under `$JAXLENS_REF_ENVS/python-<version>-<hash>`."""
    if version not in SOURCES:
        raise ValueError(f"no source known for Python {version!r}; known: {sorted(SOURCES)}")
    url, sha256 = SOURCES[version]
    key = hashlib.sha256(repr((url, sha256, CONFIGURE)).encode()).hexdigest()[:12]
    root = cache_root().resolve()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"python-{version}-{key}"
    exe = final / "bin" / f"python{version}"

    def build() -> None:
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}-src-", dir=root))
        # configure's --prefix is baked into the interpreter, so install under the final path's name in a
        # staging root (DESTDIR) and rename the tree into place when every step succeeded
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}-stage-", dir=root))
        try:
            start = time.monotonic()
            tarball = work / "src.tar.xz"
            _download(url, sha256, tarball)
            with tarfile.open(tarball) as tar:
                tar.extractall(work, filter="data")
            src = next(p for p in work.iterdir() if p.is_dir())
            jobs = str(max(1, min(os.cpu_count() or 1, 8)))
            _run(["./configure", f"--prefix={final}", *CONFIGURE], src, "configure")
            _run(["make", f"-j{jobs}"], src, "make")
            # PYTHON_FOR_BUILD=true skips precompiling the stdlib at three optimisation levels (minutes on 2
            # cores; the Makefile ignores those steps' errors) and ensurepip; .pyc files are written on use
            _run(["make", "install", f"DESTDIR={stage}", "PYTHON_FOR_BUILD=true"],
                 src, "make install")
            staged = stage / final.relative_to("/")
            if not (staged / "bin" / f"python{version}").exists():
                raise RuntimeError(f"`make install` left no bin/python{version} under {staged}")
            staged.rename(final)
            (final / "BUILD_SECONDS").write_text(f"{time.monotonic() - start:.0f}\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(stage, ignore_errors=True)

    return build_once(final, exe, build)
