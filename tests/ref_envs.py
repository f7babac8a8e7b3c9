"""Reference environments whose pins conflict with the project's (SAELens needs TransformerLens < 4,
circuit-tracer and the Flax GPT-2 need transformers <= 4.57.3): each is a venv built once into a cache
directory, reused while its requirements are unchanged, rebuilt from nothing when absent. Tests run reference
code there in a child process and exchange arrays through files (`run_script`).

The cache lives in `$JAXLENS_REF_ENVS` (default `~/.cache/jaxlens/ref-envs`). A build goes into a temporary
directory that is renamed into place only when every install succeeded, so an interrupted build is never
reused; a lock file keeps two test workers from building the same environment at once."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# torch's CPU build (a plain `torch` pulls several GB of CUDA wheels)
TORCH_CPU = ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu")


def cache_root() -> Path:
    return Path(os.environ.get("JAXLENS_REF_ENVS", Path.home() / ".cache" / "jaxlens" / "ref-envs"))


LOCKS = Path(__file__).parent / "ref_locks"


def locked(name: str, *first: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Steps installing the pinned set `tests/ref_locks/<name>.txt` (a `pip freeze` of a working environment)
    with --no-deps after the steps `first` (e.g. TORCH_CPU): no dependency resolution, so a build takes the
    time of its downloads (sae-lens's resolver alone took minutes) and every build gets the same versions."""
    return (*first, ("--no-deps", "-r", str(LOCKS / f"{name}.txt")))


def _key(name: str, steps: tuple[tuple[str, ...], ...], python: str) -> str:
    """The cache key of an environment: the pip steps with each requirements file's contents in place of its
    path, and the interpreter's version (not its path), so every checkout of the same tree shares one venv."""
    parts = []
    for step in steps:
        prev = None
        for arg in step:
            parts.append(Path(arg).read_text() if prev == "-r" else arg)
            prev = arg
        parts.append("\0")
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout
    h = hashlib.sha256(repr((parts, version)).encode())
    return f"{name}-{h.hexdigest()[:12]}"


def ensure_env(name: str, steps, *, python: str | None = None) -> Path:
    """The python executable of the venv `name`, built if needed. `steps` are the argument lists of
    successive `pip install` calls (e.g. `[TORCH_CPU, ["sae-lens==6.54.12"]]`); changing them builds a new
    environment. `python` is the base interpreter (default: the one running the tests)."""
    python = python or sys.executable
    steps = tuple(tuple(s) for s in steps)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / _key(name, steps, python)

    def build() -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            subprocess.run([python, "-m", "venv", str(tmp)], check=True)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            for step in steps:
                done = subprocess.run([*pip, *step], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(
                        f"building reference environment {name!r} failed at `pip install {' '.join(step)}`:\n"
                        f"{done.stderr[-4000:]}"
                    )
            # the venv's console scripts hard-code the build path; `python -m` / `-c` do not care
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return build_once(final, final / "bin" / "python", build)


def build_once(final: Path, exe: Path, build) -> Path:
    """`exe`, the product of the cache entry `final`: `build()` makes it (and must leave nothing at `final`
    when it fails) unless it exists, under a lock file beside `final`, so two test workers never build the
    same entry at once and the second one reuses the first one's."""
    if exe.exists():
        return exe
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.exists():  # else built by another worker while we waited
            build()
    return exe


def run_script(exe: Path, script: str, *args: str, timeout: float = 900, env: dict | None = None) -> str:
    """Runs `script` (Python source) with the reference interpreter; returns its stdout, raising with its
    stderr on failure. Offline flags are set so nothing reaches a hub."""
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    child_env = {**os.environ, **offline, **(env or {})}
    child_env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [str(exe), "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=child_env
    )
    if done.returncode != 0:
        raise RuntimeError(f"reference script failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return done.stdout
