"""GGUF model files as (Config, numpy params): dequantised (cached on disk), renamed to Hugging Face names,
converted by the family converter.

The pieces, one module each:

    _gguf_header.py     read_header, GGUFFile: one file's header (metadata, tensor table), tensors on request
    _gguf_split.py      read_gguf, dequantize_all: a model from one file or the parts of a split one
    _gguf_quant.py      dequantize: ggml's block quantisations decoded to float32
    _gguf_cache.py      cached_dequantize: every tensor, cached as safetensors keyed by the file's SHA-256
    _gguf_tokenizer.py  tokenizer_from_gguf: the tokenizer rebuilt from the metadata
    _gguf_map.py        to_hf: llama.cpp's metadata and tensor names -> a Hugging Face config and names

    cfg, params = load("SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg, params = load("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=jnp.bfloat16)   # no float32 copy
    cfg, params = load("model-00001-of-00003.gguf")     # a split model (_gguf_split), from any part
"""

import os
from typing import Any

import numpy as np

from jaxlens.converters import _gguf_map
from jaxlens.converters._gguf_cache import cached_dequantize
from jaxlens.converters._registry import convert


def load(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
         dtype=np.float32) -> tuple[Any, dict]:
    """A GGUF model file as (Config, numpy params): dequantised (cached on disk), renamed, converted.

    The tensors come from `cached_dequantize`; `jaxlens.converters._gguf_map.to_hf` turns the metadata and
    the llama.cpp tensor names into a Hugging Face config dict and names (undoing llama.cpp's q/k row
    permutation), and the family converter `jaxlens.converters.convert` builds the params, checking that
    every tensor is used.
    `cfg.default_prepend_bos` follows the file's `tokenizer.ggml.add_bos_token` when it has one.

    With `dtype` float16 or bfloat16, every tensor is decoded straight into that dtype and the converter
    keeps it (`TensorSource.dtype`): no float32 copy of the model exists at any point, and the params equal
    the float32 ones cast to `dtype` (for converters that only move data, as Llama's does).

    Args:
        path: a `.gguf` file (or any part of a split model) of a supported architecture
            (`_gguf_map.SUPPORTED`: llama (and Mixtral, llama with experts), qwen2, qwen3, qwen3moe,
            gemma, gemma3, phi3, olmo2, starcoder, command-r).
        cache_dir: the dequantisation cache; default `default_cache_dir()`.
        progress: show a progress bar while dequantising.
        dtype: float32, float16 or bfloat16 (e.g. jnp.bfloat16): the params' dtype.

    Returns:
        `(cfg, params)` with numpy params of `dtype`, as `jaxlens.converters.load` returns them.

    Raises:
        CheckpointError: as `cached_dequantize`, `_gguf_map.to_hf` and the family converter.
        InputError: another dtype.
    """
    metadata, tensors = cached_dequantize(path, cache_dir, progress=progress, dtype=dtype)
    hf, source = _gguf_map.to_hf(metadata, tensors, origin=str(path), consume=True)
    cfg, params = convert(hf, source, dtype=dtype)
    return cfg.replace(**_gguf_map.config_overrides(metadata)), params
