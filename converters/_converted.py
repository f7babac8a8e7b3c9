"""The converted-checkpoint format that `jaxlens convert` writes: a model's unprocessed params as one float32
safetensors file and its Config as JSON, loaded back by `from_pretrained` without the original checkpoint.

    save_converted("smollm2_jl", cfg, params, tokenizer)   # a folder: params.safetensors,
                                                           # jaxlens_config.json and the tokenizer's files
    save_converted("model.safetensors", cfg, params)       # or a file, its config beside it as model.json
    HookedTransformer.from_pretrained("smollm2_jl")         # the same model (processed as from the original)

Params are flattened to dotted keys (`blocks.attn.W_Q` [layer head_index d_model d_head], `embed.W_E`, ...);
the JSON holds `{"format": "jaxlens-params", "version": 1, "config": {field: value}}`. Written atomically
(`jaxlens._atomic`): an interrupted conversion leaves no half-written checkpoint.
"""

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import _atomic
from jaxlens.config import Config
from jaxlens.converters._checkpoint import read_safetensors, write_safetensors
from jaxlens.errors import CheckpointError
from jaxlens.params import check_params

#: File names inside a converted checkpoint folder.
PARAMS_FILE, CONFIG_FILE = "params.safetensors", "jaxlens_config.json"
FORMAT, VERSION = "jaxlens-params", 1


def save_converted(out: str | os.PathLike, cfg: Config, params: Mapping, tokenizer: Any = None) -> list[Path]:
    """Write params (float32, flattened) and the Config to `out`, atomically; returns the files written.

    Args:
        out: a folder (params.safetensors, jaxlens_config.json and the tokenizer's files; an existing folder
            is replaced whole) or a path ending in `.safetensors` (the config goes to the same name with
            `.json`; no tokenizer).
        cfg: the model's Config.
        params: its params (numpy or jax arrays), unprocessed so that `from_pretrained`'s processing applies.
        tokenizer: a Hugging Face tokenizer saved into the folder (`save_pretrained`), or None.
    """
    flat = flatten_params(params)
    meta = {"format": FORMAT, "version": VERSION, "config": config_to_json(cfg)}
    out = Path(out)
    if out.suffix == ".safetensors":
        with _atomic.atomic_path(out, durable=True) as tmp:
            write_safetensors(flat, tmp, metadata={"format": FORMAT})
        config_path = _atomic.write_json(out.with_suffix(".json"), meta, durable=True)
        return [out, config_path]
    with _atomic.atomic_dir(out) as tmp:
        write_safetensors(flat, tmp / PARAMS_FILE, metadata={"format": FORMAT})
        _atomic.write_json(tmp / CONFIG_FILE, meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return [out / PARAMS_FILE, out / CONFIG_FILE]


def load_converted(path: str | os.PathLike) -> tuple[Config, dict]:
    """(Config, float32 numpy params) from what `save_converted` wrote (a folder or a .safetensors file).

    Raises:
        CheckpointError: the files are missing, not a jaxlens conversion, of a newer format version, or do not
            fit their config.
    """
    cfg, params_path = converted_config(path)
    params = unflatten_params({name: read() for name, read in read_safetensors(params_path).items()})
    check_params(params, cfg)
    return cfg, params


def converted_config(path: str | os.PathLike) -> tuple[Config, Path]:
    """(Config, the params file) of what `save_converted` wrote, reading no tensor.

    Raises:
        CheckpointError: as `load_converted`.
    """
    path = Path(path)
    params_path, config_path = _files(path)
    if not params_path.is_file() or not config_path.is_file():
        raise CheckpointError(f"{path} is not a converted jaxlens checkpoint: expected {params_path} and "
                              f"{config_path} (written by `jaxlens convert`).")
    try:
        meta = json.loads(config_path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); convert the model again.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{config_path} is not a jaxlens params config (format {found!r}, expected "
                              f"{FORMAT!r}).")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{config_path} is format version {meta.get('version')!r}; this jaxlens reads "
                              f"version {VERSION}. Convert the model again with this version.")
    return config_from_json(meta["config"]), params_path


def is_converted(path: str | os.PathLike) -> bool:
    """True if `path` is a folder or .safetensors file that `save_converted` wrote (its JSON is there)."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    return path.suffix == ".safetensors" and path.with_suffix(".json").is_file()


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"blocks.attn.W_Q": array, ...} (the arrays themselves, not copies)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{"blocks.attn.W_Q": array, ...} -> nested params (the inverse of `flatten_params`)."""
    params: dict = {}
    for key, value in flat.items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params


def config_to_json(cfg: Any) -> dict[str, Any]:
    """A (possibly nested) frozen config dataclass as JSON types: tuples become lists."""
    return {f.name: _to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def config_from_json(data: Mapping[str, Any], cls: type = Config) -> Any:
    """The config dataclass `cls` from `config_to_json`'s output: lists become tuples again, nested dataclass
    fields are rebuilt from their dicts.

    Raises:
        CheckpointError: a field this version of `cls` does not have, or a value it rejects.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"The converted config has fields {unknown} that this jaxlens {cls.__name__} "
                              "does not know; convert the model again with this version.")
    fields = {k: _from_json(v, hints[k]) for k, v in data.items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"The converted config does not make a valid {cls.__name__}: {e}") from None


def _files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / PARAMS_FILE, path / CONFIG_FILE
    return path, path.with_suffix(".json")


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_json(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(value: Any, hint: Any) -> Any:
    if isinstance(value, dict):
        cls = next((t for t in _members(hint) if dataclasses.is_dataclass(t)), None)
        return config_from_json(value, cls) if cls is not None else value
    if isinstance(value, list):
        return tuple(_from_json(v, _item_hint(hint)) for v in value)
    return value


def _members(hint: Any) -> tuple:
    """The types of a union (`X | None`, `Optional[X]`), or the type itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _item_hint(hint: Any) -> Any:
    """The element type of `tuple[X, ...]` (possibly inside `| None`); Any when unknown."""
    for t in _members(hint):
        args = typing.get_args(t) if typing.get_origin(t) is tuple else ()
        if args:
            return args[0]
    return Any
