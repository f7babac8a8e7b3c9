"""Checkpoints -> (Config, numpy params): one converter module per model family, chosen through REGISTRY.

`load` takes what `jaxlens.hub.resolve` finds and dispatches on what it is:

    a Hugging Face folder (config.json + safetensors)   -> the family converter (`_registry.convert`)
    a .gguf file                                         -> `_gguf.load` (dequantised, renamed, converted)
    a `jaxlens convert` checkpoint (folder or file)      -> `_converted.load_converted`
    an in-memory `transformers` model                    -> its state dict through the family converter

and checks that every tensor was used. `load_tokenizer` finds the tokenizer that goes with the same paths.

    cfg, params = converters.load("path/to/hf_dir")
    save_converted("out_dir", cfg, params, tokenizer)        # what `jaxlens convert` writes

Layering: `jaxlens.hub` (names -> paths) knows nothing of converters; converters use hub; `HookedTransformer`
uses both. This folder is the package `jaxlens.converters` (mapped by pyproject.toml's `package-dir`); it is
never imported as a top-level `converters`, which would load every module a second time under another name.
"""
# ruff: noqa: E402  (the guard below must run before any import of a submodule)

if __name__ != "jaxlens.converters":
    raise ImportError(f"This folder is the package `jaxlens.converters`; it was imported as {__name__!r}. "
                      "Install jaxlens (`pip install -e .`) and import `jaxlens.converters`.")

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxlens import hub
from jaxlens.config import Config
from jaxlens.converters import _gguf, _registry
from jaxlens.converters._checkpoint import TensorSource, load_dir_tensors
from jaxlens.converters._converted import flatten_params as flatten_params
from jaxlens.converters._converted import is_converted as is_converted
from jaxlens.converters._converted import load_converted as load_converted
from jaxlens.converters._converted import save_converted as save_converted
from jaxlens.converters._converted import unflatten_params as unflatten_params
from jaxlens.converters._gguf_quant import float_dtype
from jaxlens.converters._gguf_split import read_gguf as read_gguf
from jaxlens.converters._gguf_tokenizer import tokenizer_from_gguf as tokenizer_from_gguf
from jaxlens.converters._registry import ENCODER_ARCHITECTURES as ENCODER_ARCHITECTURES
from jaxlens.converters._registry import FAMILIES as FAMILIES
from jaxlens.converters._registry import REGISTRY as REGISTRY
from jaxlens.converters._registry import convert as convert
from jaxlens.converters._registry import family_for as family_for
from jaxlens.errors import CheckpointError


def load(source: Any, *, allow_pickle: bool = False, dtype=np.float32) -> tuple[Config, dict]:
    """(Config, numpy params of `dtype`) from a checkpoint, unprocessed (no fold_ln or centring).

    Args:
        source: a Hugging Face folder, a .gguf file (or any part of a split one), a `jaxlens convert`
            checkpoint, a cached Hugging Face repo id or packaged model name (`jaxlens.hub.resolve`), or an
            in-memory `transformers` model.
        allow_pickle: accept pickled `*.bin` weights (they can execute code when loaded).
        dtype: float32, float16 or bfloat16: each tensor is cast (a GGUF tensor decoded) to it as it is read,
            so a half-precision model never has a float32 copy (a `jaxlens convert` checkpoint: cast after).

    Raises:
        CheckpointError: missing config, unknown architecture or config keys, missing / leftover / misshapen
            tensors.
        UnsafeCheckpointError: pickled weights without allow_pickle=True.
        ModelNotFoundError: a name that matches nothing local.
        InputError: a dtype other than float32, float16, bfloat16.
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        config = source.config
        hf = config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict()
        hf.setdefault("architectures", [type(source).__name__])
        sd = {k: _tensor_to_numpy(v) for k, v in source.state_dict().items()}
        return convert(hf, TensorSource(sd, origin=f"in-memory {type(source).__name__}"), dtype=dtype)
    path = hub.resolve(source)
    if is_converted(path):
        cfg, params = load_converted(path)
        return cfg, _registry._to_dtype(params, float_dtype(dtype))
    if path.is_file():
        return _gguf.load(path, dtype=dtype)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory holding config.json and weights.")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json; jaxlens needs it to know the architecture.")
    hf = json.loads(config_file.read_text())
    family_for(hf)  # an unknown architecture is reported before any weight is read
    return convert(hf, load_dir_tensors(path, allow_pickle=allow_pickle), dtype=dtype)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored beside (folder) or inside (GGUF file) the weights; None if there is none.

    `path` is what `jaxlens.hub.resolve` returned: pass a repo id or packaged name through `resolve` first.

    Raises:
        CheckpointError: a GGUF file whose tokenizer metadata is broken.
    """
    from jaxlens import tokenizer as tok

    path = Path(path)
    if path.is_dir():
        return tok.load_tokenizer(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        metadata = read_gguf(path).metadata
        return tokenizer_from_gguf(metadata) if "tokenizer.ggml.tokens" in metadata else None
    return None  # a converted .safetensors file keeps no tokenizer


def _tensor_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()
